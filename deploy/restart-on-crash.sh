#!/bin/sh
# Runs one service and starts it again whenever it crashes or is killed, so `make run`
# heals like `restart: unless-stopped` in compose. A clean exit (0) or a configuration
# error (78: no model, no such source, ...) is final.
while :; do
  "$@"
  code=$?
  case "$code" in 0|78) exit "$code" ;; esac
  echo "restart-on-crash: '$*' exited with status $code; starting it again in 1 s" >&2
  sleep 1
done
