#!/usr/bin/env bash
# Nightly scoring: the script of the CronJob binllm-score-nightly (cluster/kuberay/score-nightly.yaml).
# kustomize puts it into a ConfigMap (configMapGenerator in kustomization.yaml); the CronJob mounts that
# at /opt/binllm and runs /opt/binllm/score-nightly.sh. tests/test_nightly_cronjob.py runs it with bash
# against a fake kubectl; tests/test_shell_scripts.py runs shellcheck on it.
#
# It creates the RayJob binllm-score-YYYY-MM-DD from the template TEMPLATE (the ConfigMap
# binllm-score-rayjob), follows it to the end and exits with a code that says how it ended:
#   0 SUCCEEDED; 1 the Ray job failed (jobStatus FAILED, or the RayJob Failed after its retries);
#   2 KubeRay or the API server rejected the RayJob (ValidationFailed, invalid spec); 3 the Ray job was
#   STOPPED; 4 out of time (the RayJob's deadline, or the script's budget); 5 Kubernetes trouble (kubectl
#   kept failing, the RayJob vanished, or KubeRay never picked it up); 6 bad configuration (SCORE_DT,
#   BINLLM_IMAGE, the template, a budget too small); 143 SIGTERM (the RayJob is left as it is).
#
# Environment (set by the CronJob): SCORE_DT (YYYY-MM-DD; empty: today in UTC), BINLLM_IMAGE,
# DEADLINE_SECONDS (43200, = the Job's activeDeadlineSeconds), PRUNE_AFTER_DAYS (7; 0 keeps every
# finished RayJob). Tunables, with their defaults: RESERVE_SECONDS 900, RAYJOB_RETRY_OVERHEAD_SECONDS 300,
# RAYJOB_MIN_DEADLINE_SECONDS 1800, POLL_SECONDS 30, PICKUP_TIMEOUT_SECONDS 600, KUBECTL_ATTEMPTS 8,
# KUBECTL_RETRY_DELAY_SECONDS 2, KUBECTL_RETRY_MAX_DELAY_SECONDS 60, KUBECTL_REQUEST_TIMEOUT 60s,
# DELETE_TIMEOUT_SECONDS 600, DELETE_ON_TIMEOUT true, TEMPLATE /templates/rayjob.yaml.
#
# Errors: every failure the script expects (each kubectl call, each check) is handled where it happens,
# in an `if` or after `||`, so that one failed call cannot end the night with the wrong exit code; -e
# only stops it on something unforeseen.
set -euo pipefail

dt="${SCORE_DT:-$(date -u +%Y-%m-%d)}"
name="binllm-score-${dt}"
image="${BINLLM_IMAGE:-}"
template="${TEMPLATE:-/templates/rayjob.yaml}"
deadline_s="${DEADLINE_SECONDS:-43200}"
reserve_s="${RESERVE_SECONDS:-900}"
retry_overhead_s="${RAYJOB_RETRY_OVERHEAD_SECONDS:-300}"
min_attempt_s="${RAYJOB_MIN_DEADLINE_SECONDS:-1800}"
poll_s="${POLL_SECONDS:-30}"
pickup_s="${PICKUP_TIMEOUT_SECONDS:-600}"
attempts="${KUBECTL_ATTEMPTS:-8}"
retry_delay_s="${KUBECTL_RETRY_DELAY_SECONDS:-2}"
retry_max_delay_s="${KUBECTL_RETRY_MAX_DELAY_SECONDS:-60}"
request_timeout="${KUBECTL_REQUEST_TIMEOUT:-60s}"
delete_timeout_s="${DELETE_TIMEOUT_SECONDS:-600}"
delete_on_timeout="${DELETE_ON_TIMEOUT:-true}"
prune_days="${PRUNE_AFTER_DAYS:-7}"
selector="app.kubernetes.io/name=binllm,app.kubernetes.io/component=score"
started=$(date -u +%s)

log() { printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
die() { local code=$1; shift; log "$name: $*"; exit "$code"; }
nap_pid=""
nap() { sleep "$1" & nap_pid=$!; wait "$nap_pid"; }   # a SIGTERM interrupts the wait at once
now() { date -u +%s; }

work=$(mktemp -d) || { log "mktemp failed"; exit 6; }
trap 'rm -rf "$work"' EXIT
# (|| true: under -e a failed kill, of a nap that has already ended, would end the trap with code 1)
trap '[ -z "$nap_pid" ] || kill "$nap_pid" 2>/dev/null || true; log "$name: terminated by SIGTERM; the RayJob is left as it is"; exit 143' TERM
: >"$work/err"
lasterr() { local e; e=$(<"$work/err"); e=${e//$'\n'/ }; printf '%s' "${e:0:600}"; }

# retry CMD...: runs CMD; a failure that may pass (API server unreachable, timeouts,
# 5xx, throttling, conflicts) is tried again, up to $attempts tries in all, after
# retry_delay_s, then twice as long each time (at most retry_max_delay_s). Errors no
# retry can fix (NotFound, AlreadyExists, Forbidden, Unauthorized, invalid input) return
# at once. Prints CMD's output when it succeeds; the last error stays in $work/err.
retry() {
  local try=1 delay=$retry_delay_s
  while :; do
    if "$@" >"$work/out" 2>"$work/err"; then cat "$work/out"; return 0; fi
    if grep -qE '\((NotFound|AlreadyExists|Forbidden|Unauthorized|BadRequest|Invalid)\)| is invalid|strict decoding error|unknown field' "$work/err"; then
      return 1
    fi
    if [ "$try" -ge "$attempts" ]; then
      log "kubectl ${*:4:3}: failed $try times: $(lasterr)" >&2
      return 1
    fi
    log "kubectl ${*:4:3}: $(lasterr) (try $try of $attempts, again in ${delay}s)" >&2
    nap "$delay"
    try=$((try + 1))
    delay=$((delay * 2 > retry_max_delay_s ? retry_max_delay_s : delay * 2))
  done
}
# Every kubectl call below goes through retry, with a bound on each request.
kubectl() { retry command kubectl --request-timeout="$request_timeout" "$@"; }

# --- configuration -------------------------------------------------------------
for var in deadline_s reserve_s retry_overhead_s min_attempt_s poll_s pickup_s attempts \
           retry_delay_s retry_max_delay_s delete_timeout_s prune_days; do
  [[ "${!var}" =~ ^(0|[1-9][0-9]*)$ ]] || die 6 "$var must be a whole number of seconds/days, not '${!var}'"
done
[ "$attempts" -ge 1 ] || die 6 "KUBECTL_ATTEMPTS must be at least 1"
[[ "$dt" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]] || die 6 "SCORE_DT must be YYYY-MM-DD, not '$dt'"
[[ "$image" =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || die 6 "BINLLM_IMAGE must be an image reference, not '$image'"
[ -r "$template" ] || die 6 "no RayJob template at $template"
budget_end=$((started + deadline_s - reserve_s))
backoff=$(sed -n 's/^  backoffLimit: *\([0-9][0-9]*\).*/\1/p' "$template" | head -n 1) || true   # no line: 0
backoff=${backoff:-0}
log "$name: image $image, RayJob backoffLimit $backoff, budget $((budget_end - started))s (Job deadline ${deadline_s}s less ${reserve_s}s reserve)"

# --- prune finished score RayJobs older than PRUNE_AFTER_DAYS (never fails the night)
prune() {
  local cutoff list n ts state victims=()
  [ "$prune_days" -gt 0 ] || return 0
  cutoff=$(date -u -d "@$(( $(now) - prune_days * 86400 ))" +%Y-%m-%dT%H:%M:%SZ) || return 0
  if ! list=$(kubectl get rayjobs -l "$selector" \
      -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.metadata.creationTimestamp}{" "}{.status.jobDeploymentStatus}{"\n"}{end}'); then
    log "prune skipped: cannot list RayJobs: $(lasterr)"
    return 0
  fi
  while read -r n ts state; do
    [ -n "$n" ] && [ "$n" != "$name" ] || continue
    case "$state" in Complete|Failed|ValidationFailed) ;; *) continue ;; esac
    [[ "$ts" < "$cutoff" ]] && victims+=("$n")
  done <<<"$list"
  [ "${#victims[@]}" -gt 0 ] || return 0
  log "pruning ${#victims[@]} finished RayJob(s) created before $cutoff: ${victims[*]}"
  kubectl delete rayjob "${victims[@]}" --ignore-not-found --wait=false >/dev/null \
    || log "prune failed: $(lasterr)"
}
prune

# --- rerunning a date: delete its old RayJob (KubeRay stops its Ray job) and wait until it is gone
kubectl delete rayjob "$name" --ignore-not-found --wait=false >/dev/null \
  || die 5 "cannot delete the old RayJob: $(lasterr)"
gone_by=$(( $(now) + delete_timeout_s ))
while :; do
  old=$(kubectl get rayjob "$name" --ignore-not-found -o name) || die 5 "cannot read RayJob $name: $(lasterr)"
  [ -n "$old" ] || break
  [ "$(now)" -lt "$gone_by" ] || die 5 "the old RayJob is still being deleted after ${delete_timeout_s}s"
  nap "$poll_s"
done

# --- the time budget: split what is left over the RayJob's 1 + backoffLimit attempts
remaining=$(( budget_end - $(now) ))
attempt_s=$(( (remaining - backoff * retry_overhead_s) / (backoff + 1) ))
[ "$attempt_s" -ge "$min_attempt_s" ] && [ "$attempt_s" -ge 1 ] \
  || die 6 "${remaining}s left cannot give $((backoff + 1)) attempt(s) ${min_attempt_s}s each: raise activeDeadlineSeconds and DEADLINE_SECONDS, or lower backoffLimit"

sed -e "s|@SCORE_DT@|${dt}|g" -e "s|@BINLLM_IMAGE@|${image}|g" \
    -e "s|\"@RAYJOB_DEADLINE_SECONDS@\"|${attempt_s}|g" "$template" >"$work/rayjob.yaml" \
  || die 6 "cannot fill in the template"
if grep -n '@[A-Z_][A-Z_]*@' "$work/rayjob.yaml"; then die 6 "the template has a placeholder the script does not fill"; fi

if kubectl create -f "$work/rayjob.yaml" >/dev/null; then
  log "$name: created; up to $((backoff + 1)) attempt(s) of ${attempt_s}s each"
elif grep -q '(AlreadyExists)' "$work/err"; then
  log "$name: already exists (a retried create went through); following it"
elif grep -qE '\((Invalid|BadRequest)\)| is invalid|strict decoding error|unknown field' "$work/err"; then
  die 2 "the API server rejected the RayJob (is KubeRay v1.2 or newer installed?): $(lasterr)"
else
  die 5 "cannot create the RayJob: $(lasterr)"
fi
created=$(now)

# --- follow it until it ends or the budget runs out
fmt='{.status.jobDeploymentStatus}|{.status.jobStatus}|{.status.reason}|{.status.failed}|{.status.message}'
seen=""
while :; do
  t=$(now)
  if [ "$t" -ge "$budget_end" ]; then
    log "$name: out of time: the budget ends ${reserve_s}s before the Job's ${deadline_s}s deadline"
    if [ "$delete_on_timeout" = true ]; then
      if kubectl delete rayjob "$name" --ignore-not-found --wait=false >/dev/null; then
        log "$name: deleted (KubeRay stops the Ray job and deletes its RayCluster)"
      else
        log "$name: could not delete it: $(lasterr)"
      fi
    fi
    exit 4
  fi
  if ! status=$(kubectl get rayjob "$name" -o jsonpath="$fmt"); then
    grep -q '(NotFound)' "$work/err" && die 5 "the RayJob was deleted before it finished"
    die 5 "cannot read the RayJob's status ($attempts tries); it may still be running: $(lasterr)"
  fi
  IFS='|' read -r dep job reason failed message <<<"$status"
  if [ "$dep|$job|$failed" != "$seen" ]; then
    seen="$dep|$job|$failed"
    case "$dep" in
      Retrying) log "$name: attempt ${failed:-?} failed${reason:+ ($reason)}; KubeRay retries on a new RayCluster (backoffLimit $backoff)" ;;
      Suspending|Suspended) log "$name: $dep (spec.suspend is set, e.g. queued by Kueue); waiting within the budget" ;;
      *) log "$name: ${dep:-New}${job:+, Ray job $job}" ;;
    esac
  fi
  case "$dep" in
    Complete)
      case "$job" in
        SUCCEEDED) log "$name: SUCCEEDED"; exit 0 ;;
        STOPPED) die 3 "the Ray job was STOPPED${message:+: $message}" ;;
        FAILED) die 1 "the Ray job FAILED${message:+: $message}" ;;
        *) die 1 "finished with Ray job status '${job}'${message:+: $message}" ;;
      esac ;;
    Failed)
      case "$reason" in
        DeadlineExceeded|PreRunningDeadlineExceeded)
          die 4 "Failed: $reason (activeDeadlineSeconds ${attempt_s})${message:+: $message}" ;;
        *) die 1 "Failed after ${failed:-1} attempt(s)${reason:+: $reason}${message:+: $message}" ;;
      esac ;;
    ValidationFailed)
      die 2 "ValidationFailed: KubeRay rejected the RayJob: ${message:-see kubectl describe rayjob $name}" ;;
    "")
      [ $((t - created)) -lt "$pickup_s" ] \
        || die 5 "KubeRay has not picked the RayJob up in ${pickup_s}s: is the operator running? (before v1.5 it reports spec errors only as events: kubectl describe rayjob $name)" ;;
    *) ;;   # Initializing, Running, Retrying, Suspending, Suspended, Waiting, or newer: wait
  esac
  left=$((budget_end - t))
  nap $((left < poll_s ? left : poll_s))
done
