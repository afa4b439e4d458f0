{{/* Names */}}
{{- define "es.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "es.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>" for a dict with "root" and "component" */}}
{{- define "es.component" -}}
{{- printf "%s-%s" (include "es.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "es.selectorLabels" -}}
app.kubernetes.io/name: {{ include "es.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "es.labels" -}}
{{ include "es.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: emotion-stream
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "es.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "es.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference: repository@digest when a digest is set, else repository:tag */}}
{{- define "es.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "es.curveSecret" -}}
{{- if not .Values.curve.existingSecret -}}
{{- fail "curve.enabled is true but curve.existingSecret is empty. Make the keys and a Secret first:\n  python -m services.common.keys keys/\n  kubectl create secret generic emotion-stream-curve --from-file=keys/\nthen install with --set curve.existingSecret=emotion-stream-curve (or --set curve.enabled=false on a trusted network)" -}}
{{- end -}}
{{- .Values.curve.existingSecret -}}
{{- end -}}

{{/* The sign-in secrets from the Secret auth.existingSecret, as files in /app/auth: the
session signing key (key "secret"; viewer and recorder) and, for the recorder only, the
first admin's password (key "admin-password", optional: without it one is generated and
logged once). */}}
{{- define "es.authVolume" -}}
name: auth
projected:
  defaultMode: 288
  sources:
    - secret:
        name: {{ .root.Values.auth.existingSecret | quote }}
        items:
          - {key: secret, path: secret}
    {{- if .adminPassword }}
    - secret:
        name: {{ .root.Values.auth.existingSecret | quote }}
        optional: true
        items:
          - {key: admin-password, path: admin-password}
    {{- end }}
{{- end -}}

{{/* The broker's address inside the cluster */}}
{{- define "es.brokerHost" -}}
{{- printf "%s.%s.svc" (include "es.component" (dict "root" . "component" "broker")) .Release.Namespace -}}
{{- end -}}

{{/*
A pod spec for one component. Arguments (a dict):
  root       the chart's top context
  component  broker, capture, detector, ...
  values     the component's values
  module     python -m services.<module>
  image      "base" or "ml"
  metricsPort
  env        extra environment (list of {name, value})
  ports      extra container ports (list)
  volumes / volumeMounts / initContainers   extra (lists)
  spread     spread the replicas over the nodes
  probePort  the port /healthz is checked on (default metricsPort)
*/}}
{{- define "es.podTemplate" -}}
{{- $root := .root -}}
{{- $v := .values -}}
metadata:
  labels:
    {{- include "es.selectorLabels" . | nindent 4 }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "es.serviceAccountName" $root }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .initContainers }}
  initContainers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "es.image" (index $root.Values.image .image) | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["python", "-m", "services.{{ .module }}"]
      env:
        - name: EMOTION_BROKER_HOST
          value: {{ include "es.brokerHost" $root | quote }}
        - name: EMOTION_BASE_PORT
          value: {{ $root.Values.basePort | quote }}
        - name: EMOTION_METRICS_HOST
          value: "0.0.0.0"
        - name: EMOTION_METRICS_PORT
          value: {{ .metricsPort | quote }}
        - name: EMOTION_LOG_LEVEL
          value: {{ $root.Values.logLevel | quote }}
        {{- if $root.Values.curve.enabled }}
        - name: EMOTION_CURVE_KEYS
          value: /app/curve
        {{- end }}
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- range $name, $value := $v.env }}
        - name: {{ $name }}
          value: {{ $value | quote }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ .metricsPort }}
          protocol: TCP
        {{- with .ports }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet: {path: /healthz, port: {{ .probePort | default "metrics" }}}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: {{ .startupFailures | default 12 }}
      livenessProbe:
        httpGet: {path: /healthz, port: {{ .probePort | default "metrics" }}}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        httpGet: {path: /healthz, port: {{ .probePort | default "metrics" }}}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 2
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $root.Values.curve.enabled }}
        - name: curve
          mountPath: /app/curve
          readOnly: true
        {{- end }}
        {{- with .volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.tmpSizeLimit }}
    {{- if $root.Values.curve.enabled }}
    - name: curve
      {{- if eq .component "broker" }}
      projected:
        defaultMode: 0440
        sources:
          - secret:
              name: {{ include "es.curveSecret" $root }}
              items:
                - {key: broker.key, path: broker.key}
                - {key: broker.key_secret, path: broker.key_secret}
                - {key: client.key, path: clients/cluster.key}
          {{- if $root.Values.curve.authorizedClients }}
          - configMap:
              name: {{ include "es.component" (dict "root" $root "component" "curve-clients") }}
              items:
                {{- range $name, $_ := $root.Values.curve.authorizedClients }}
                - {key: {{ $name }}.key, path: clients/{{ $name }}.key}
                {{- end }}
          {{- end }}
      {{- else }}
      secret:
        secretName: {{ include "es.curveSecret" $root }}
        defaultMode: 0440
        items:
          - {key: broker.key, path: broker.key}
          - {key: client.key, path: client.key}
          - {key: client.key_secret, path: client.key_secret}
      {{- end }}
    {{- end }}
    {{- with .volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if .spread }}
  {{- if $root.Values.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
      topologyKey: {{ $root.Values.topologySpread.topologyKey }}
      whenUnsatisfiable: {{ $root.Values.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "es.selectorLabels" . | nindent 10 }}
  {{- end }}
  {{- end }}
  {{- with $root.Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* A Deployment for one component (same arguments as es.podTemplate, plus replicas and strategy) */}}
{{- define "es.deployment" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "es.component" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "es.labels" . | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ .replicas | default 1 }}
  {{- end }}
  revisionHistoryLimit: 3
  {{- if .recreate }}
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "es.selectorLabels" . | nindent 6 }}
  template:
    {{- include "es.podTemplate" . | nindent 4 }}
{{- end -}}

{{/* The camera inventory's ConfigMap as a pod volume (values: cameras). */}}
{{- define "es.camerasVolume" -}}
name: cameras
configMap:
  name: {{ include "es.component" (dict "root" . "component" "cameras") }}
{{- end }}

{{/* Where the recorder and the viewer ask capture for each camera's state (its /cameras). */}}
{{- define "es.captureUrl" -}}
http://{{ include "es.component" (dict "root" . "component" "capture") }}:9101
{{- end }}
