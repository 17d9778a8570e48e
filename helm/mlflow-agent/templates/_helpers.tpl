{{/*
Named templates of the mlflow-agent chart.

Templates meant for other charts (they take the chart's context: `.` inside this chart, or
`(index .Subcharts "mlflow-agent")` in a parent chart that depends on it; with an alias, use the alias):
  mlflow-agent.sidecar                         the agent as a native sidecar: one initContainers list item
  mlflow-agent.sidecar.volumes                 the volumes it needs: volumes list items
  mlflow-agent.sidecar.clientEnv               env list items for the training container (MLFLOW_TRACKING_URI)
  mlflow-agent.sidecar.podLabels               pod labels it needs (Azure workload identity), may be empty
  mlflow-agent.podSecurityContext              the pod securityContext (fsGroup for a PVC spool)
  mlflow-agent.terminationGracePeriodSeconds   drain + margin, for the pod spec
  mlflow-agent.serviceAccountName              the ServiceAccount this chart creates or names
*/}}

{{- define "mlflow-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Lower case: a parent chart's alias (e.g. mlflowAgent) must not put capitals into object names. */}}
{{- define "mlflow-agent.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | lower | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride | lower }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mlflow-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlflow-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlflow-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mlflow-agent.labels" -}}
helm.sh/chart: {{ include "mlflow-agent.chart" . }}
{{ include "mlflow-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mlflow-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mlflow-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mlflow-agent.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (include "mlflow-agent.settingValue" (default .Chart.AppVersion $img.tag)) }}
{{- end }}
{{- end }}

{{/*
A setting's value as text. JSON/YAML numbers arrive as float64: 1073741824 must not become "1.073741824e+09".
*/}}
{{- define "mlflow-agent.settingValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ regexReplaceAll "0+$" (printf "%f" .) "" }}{{ end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Where the spool volume is mounted; the agent creates its spool directory (0700) inside. */}}
{{- define "mlflow-agent.spoolMount" -}}/var/lib/mlflow-agent{{- end }}

{{- define "mlflow-agent.daemonset.hostPath" -}}
{{- default (printf "/var/lib/mlflow-agent/%s" .Release.Name) .Values.daemonset.spool.hostPath }}
{{- end }}

{{- define "mlflow-agent.caBundleDir" -}}/etc/mlflow-agent/upstream-ca{{- end }}
{{- define "mlflow-agent.saTokenDir" -}}/var/run/secrets/mlflow-agent/upstream-token{{- end }}

{{/* preStop sleep of a mode: (dict "ctx" $ "mode" "daemonset"|"sidecar") */}}
{{- define "mlflow-agent.preStopSleep" -}}
{{- $v := .ctx.Values }}
{{- if eq .mode "daemonset" }}{{ int $v.daemonset.preStopSleepSeconds }}{{ else }}{{ int $v.sidecar.preStopSleepSeconds }}{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + drain timeout + 15 s (the process's own exit, the last
upload's request), or the user's value when it is larger than preStop sleep + drain timeout.
Context: (dict "ctx" $ "mode" ...) or the chart context (then the sidecar's).
*/}}
{{- define "mlflow-agent.terminationGracePeriodSeconds" -}}
{{- $ctx := . }}{{ $mode := "sidecar" }}
{{- if hasKey . "ctx" }}{{ $ctx = .ctx }}{{ $mode = .mode }}{{ end }}
{{- $v := $ctx.Values }}
{{- $needed := add (include "mlflow-agent.preStopSleep" (dict "ctx" $ctx "mode" $mode) | int) (int $v.agent.drainTimeoutSeconds) }}
{{- if kindIs "invalid" $v.terminationGracePeriodSeconds }}
{{- add $needed 15 }}
{{- else if le (int $v.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than the preStop sleep plus agent.drainTimeoutSeconds (%d), or the agent is killed while it drains; leave it null to derive it" (int $v.terminationGracePeriodSeconds) $needed) }}
{{- else }}
{{- int $v.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Checks of combinations the schema cannot explain well. Context: (dict "ctx" $ "mode" ...).
Renders nothing when the values are consistent.
*/}}
{{- define "mlflow-agent.validate" -}}
{{- $v := .ctx.Values }}
{{- $up := $v.upstream }}
{{- if and $up.uri $up.uriKey }}
{{- fail "set upstream.uri or upstream.uriKey (a key of upstream.existingSecret), not both" }}
{{- end }}
{{- if not (or $up.uri $up.uriKey) }}
{{- fail "no upstream: set upstream.uri (http(s)://... or azureml://...), or upstream.existingSecret and upstream.uriKey" }}
{{- end }}
{{- if and (or $up.uriKey $up.tokenKey $up.usernameKey $up.passwordKey) (not $up.existingSecret) }}
{{- fail "upstream.uriKey/tokenKey/usernameKey/passwordKey name keys of upstream.existingSecret: set upstream.existingSecret" }}
{{- end }}
{{- if and $up.existingSecret (not (or $up.uriKey $up.tokenKey $up.usernameKey $up.passwordKey)) }}
{{- fail "upstream.existingSecret is set but none of upstream.uriKey, tokenKey, usernameKey, passwordKey is" }}
{{- end }}
{{- if ne (empty $up.usernameKey) (empty $up.passwordKey) }}
{{- fail "basic auth needs both upstream.usernameKey and upstream.passwordKey" }}
{{- end }}
{{- if and $up.tokenKey (or $up.usernameKey $up.serviceAccountToken.enabled) }}
{{- fail "choose one upstream credential: upstream.tokenKey, upstream.usernameKey/passwordKey or upstream.serviceAccountToken" }}
{{- end }}
{{- if and $up.serviceAccountToken.enabled (not $up.serviceAccountToken.audience) }}
{{- fail "upstream.serviceAccountToken.enabled needs upstream.serviceAccountToken.audience" }}
{{- end }}
{{- if and $up.serviceAccountToken.enabled (hasKey $v.agent.extraSettings "token_file") }}
{{- fail "agent.extraSettings.token_file conflicts with upstream.serviceAccountToken.enabled" }}
{{- end }}
{{- if and $up.tls.caBundle.secretName $up.tls.caBundle.configMapName }}
{{- fail "upstream.tls.caBundle: set secretName or configMapName, not both" }}
{{- end }}
{{- if and $v.azure.workloadIdentity.enabled (not $v.azure.workloadIdentity.clientId) }}
{{- fail "azure.workloadIdentity.enabled needs azure.workloadIdentity.clientId (the managed identity's client id)" }}
{{- end }}
{{- if eq .mode "daemonset" }}
{{- if and (not $v.ingestToken.existingSecret) (not $v.allowUnauthenticatedBind) }}
{{- fail "mode=daemonset binds the agent's HTTP port to 0.0.0.0 (reachable through the node's IP): set ingestToken.existingSecret (a Secret holding the token clients send), or allowUnauthenticatedBind=true to accept unauthenticated writes" }}
{{- end }}
{{- if and $v.udp.enabled (not $v.allowUnauthenticatedBind) }}
{{- fail "mode=daemonset with udp.enabled binds UDP to 0.0.0.0 and datagrams carry no token: set udp.enabled=false, or allowUnauthenticatedBind=true to accept them from anything that reaches the node" }}
{{- end }}
{{- end }}
{{- if eq (int $v.ports.http) (int $v.ports.ops) }}
{{- fail "ports.http and ports.ops must differ" }}
{{- end }}
{{- end }}

{{/* The agent's environment. Context: (dict "ctx" $ "mode" ...). */}}
{{- define "mlflow-agent.env" -}}
{{- $v := .ctx.Values }}
{{- $up := $v.upstream }}
{{- $bind := ternary "0.0.0.0" "127.0.0.1" (eq .mode "daemonset") }}
- name: MLFLOW_AGENT_UPSTREAM
{{- if $up.uri }}
  value: {{ $up.uri | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ $up.existingSecret | quote }}
      key: {{ $up.uriKey | quote }}
{{- end }}
- name: MLFLOW_AGENT_HTTP
  value: {{ printf "%s:%d" $bind (int $v.ports.http) | quote }}
- name: MLFLOW_AGENT_UDP
  value: {{ ternary (printf "%s:%d" $bind (int $v.ports.udp)) "none" $v.udp.enabled | quote }}
- name: MLFLOW_AGENT_OPS_HTTP
  value: {{ printf "0.0.0.0:%d" (int $v.ports.ops) | quote }}
- name: MLFLOW_AGENT_SPOOL_DIR
  value: {{ printf "%s/spool" (include "mlflow-agent.spoolMount" .ctx) | quote }}
- name: MLFLOW_AGENT_SPOOL_MAX_BYTES
  value: {{ include "mlflow-agent.settingValue" $v.agent.spoolMaxBytes | quote }}
- name: MLFLOW_AGENT_ARTIFACT_MAX_BYTES
  value: {{ include "mlflow-agent.settingValue" $v.agent.artifactMaxBytes | quote }}
- name: MLFLOW_AGENT_DRAIN_TIMEOUT
  value: {{ printf "%ds" (int $v.agent.drainTimeoutSeconds) | quote }}
- name: MLFLOW_AGENT_LOG_LEVEL
  value: {{ $v.agent.logLevel | quote }}
{{- if and (eq .mode "daemonset") $v.allowUnauthenticatedBind }}
- name: MLFLOW_AGENT_ALLOW_UNAUTHENTICATED_BIND
  value: "true"
{{- end }}
{{- if $v.ingestToken.existingSecret }}
- name: MLFLOW_AGENT_INGEST_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.ingestToken.existingSecret | quote }}
      key: {{ $v.ingestToken.key | quote }}
{{- end }}
{{- if $up.serviceAccountToken.enabled }}
- name: MLFLOW_AGENT_TOKEN_FILE
  value: {{ printf "%s/token" (include "mlflow-agent.saTokenDir" .ctx) | quote }}
{{- end }}
{{- range $key := list "tokenKey" "usernameKey" "passwordKey" }}
{{- $secretKey := index $up $key }}
{{- if $secretKey }}
- name: {{ get (dict "tokenKey" "MLFLOW_TRACKING_TOKEN" "usernameKey" "MLFLOW_TRACKING_USERNAME" "passwordKey" "MLFLOW_TRACKING_PASSWORD") $key }}
  valueFrom:
    secretKeyRef:
      name: {{ $up.existingSecret | quote }}
      key: {{ $secretKey | quote }}
{{- end }}
{{- end }}
{{- $ca := $up.tls.caBundle }}
{{- if or $ca.secretName $ca.configMapName }}
- name: MLFLOW_TRACKING_SERVER_CERT_PATH
  value: {{ printf "%s/%s" (include "mlflow-agent.caBundleDir" .ctx) $ca.key | quote }}
{{- end }}
{{- if $up.tls.insecureSkipVerify }}
- name: MLFLOW_TRACKING_INSECURE_TLS
  value: "true"
{{- end }}
{{- range $name, $value := $v.agent.extraSettings }}
- name: {{ printf "MLFLOW_AGENT_%s" (upper $name) }}
  value: {{ include "mlflow-agent.settingValue" $value | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The agent container (a map, without the list dash). Context: (dict "ctx" $ "mode" ...).
*/}}
{{- define "mlflow-agent.container" -}}
{{- $v := .ctx.Values }}
{{- $ds := eq .mode "daemonset" }}
{{- $sleep := include "mlflow-agent.preStopSleep" . | int }}
name: mlflow-agent
image: {{ include "mlflow-agent.image" .ctx | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
{{- if not $ds }}
# A native sidecar: starts before the main containers, runs beside them, stops after them.
restartPolicy: Always
{{- end }}
args: ["--log-format", {{ $v.agent.logFormat | quote }}]
env:
  {{- include "mlflow-agent.env" . | trim | nindent 2 }}
ports:
  - name: http
    containerPort: {{ int $v.ports.http }}
    protocol: TCP
    {{- if $ds }}
    hostPort: {{ int $v.ports.http }}
    {{- end }}
  {{- if $v.udp.enabled }}
  - name: udp
    containerPort: {{ int $v.ports.udp }}
    protocol: UDP
    {{- if $ds }}
    hostPort: {{ int $v.ports.udp }}
    {{- end }}
  {{- end }}
  - name: ops
    containerPort: {{ int $v.ports.ops }}
    protocol: TCP
startupProbe:
  httpGet:
    path: /healthz
    port: ops
  periodSeconds: {{ int $v.probes.startup.periodSeconds }}
  failureThreshold: {{ int $v.probes.startup.failureThreshold }}
  timeoutSeconds: {{ int $v.probes.startup.timeoutSeconds }}
livenessProbe:
  httpGet:
    path: /healthz
    port: ops
  periodSeconds: {{ int $v.probes.liveness.periodSeconds }}
  failureThreshold: {{ int $v.probes.liveness.failureThreshold }}
  timeoutSeconds: {{ int $v.probes.liveness.timeoutSeconds }}
readinessProbe:
  httpGet:
    path: /readyz
    port: ops
  periodSeconds: {{ int $v.probes.readiness.periodSeconds }}
  failureThreshold: {{ int $v.probes.readiness.failureThreshold }}
  timeoutSeconds: {{ int $v.probes.readiness.timeoutSeconds }}
{{- if gt $sleep 0 }}
lifecycle:
  # Clients keep sending for a moment after the pod starts terminating: let them notice first. The agent
  # then gets SIGTERM, stops accepting and drains for agent.drainTimeoutSeconds.
  preStop:
    exec:
      command: ["sleep", {{ $sleep | toString | quote }}]
{{- end }}
resources:
  {{- toYaml $v.resources | nindent 2 }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
volumeMounts:
  - name: mlflow-agent-spool
    mountPath: {{ include "mlflow-agent.spoolMount" .ctx }}
  - name: mlflow-agent-tmp
    mountPath: /tmp
  {{- if $v.upstream.serviceAccountToken.enabled }}
  - name: mlflow-agent-upstream-token
    mountPath: {{ include "mlflow-agent.saTokenDir" .ctx }}
    readOnly: true
  {{- end }}
  {{- if or $v.upstream.tls.caBundle.secretName $v.upstream.tls.caBundle.configMapName }}
  - name: mlflow-agent-upstream-ca
    mountPath: {{ include "mlflow-agent.caBundleDir" .ctx }}
    readOnly: true
  {{- end }}
  {{- with $v.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The pod volumes the agent container mounts (list items). Context: (dict "ctx" $ "mode" ...). */}}
{{- define "mlflow-agent.volumes" -}}
{{- $v := .ctx.Values }}
{{- if eq .mode "daemonset" }}
- name: mlflow-agent-spool
  hostPath:
    path: {{ include "mlflow-agent.daemonset.hostPath" .ctx | quote }}
    type: DirectoryOrCreate
{{- else if $v.sidecar.spool.existingClaim }}
- name: mlflow-agent-spool
  persistentVolumeClaim:
    claimName: {{ $v.sidecar.spool.existingClaim | quote }}
{{- else }}
- name: mlflow-agent-spool
  emptyDir:
    {{- with $v.sidecar.spool.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ $v.sidecar.spool.sizeLimit | toString | quote }}
{{- end }}
- name: mlflow-agent-tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.tmp.sizeLimit | toString | quote }}
{{- $up := $v.upstream }}
{{- if $up.serviceAccountToken.enabled }}
- name: mlflow-agent-upstream-token
  projected:
    sources:
      - serviceAccountToken:
          path: token
          audience: {{ $up.serviceAccountToken.audience | quote }}
          expirationSeconds: {{ int $up.serviceAccountToken.expirationSeconds }}
{{- end }}
{{- $ca := $up.tls.caBundle }}
{{- if $ca.secretName }}
- name: mlflow-agent-upstream-ca
  secret:
    secretName: {{ $ca.secretName | quote }}
    items:
      - key: {{ $ca.key | quote }}
        path: {{ $ca.key | quote }}
{{- else if $ca.configMapName }}
- name: mlflow-agent-upstream-ca
  configMap:
    name: {{ $ca.configMapName | quote }}
    items:
      - key: {{ $ca.key | quote }}
        path: {{ $ca.key | quote }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod labels of the agent's pods beyond the selector labels. Context: the chart context. */}}
{{- define "mlflow-agent.sidecar.podLabels" -}}
{{- if .Values.azure.workloadIdentity.enabled -}}
azure.workload.identity/use: "true"
{{- end }}
{{- end }}

{{- define "mlflow-agent.metricsAnnotations" -}}
{{- if .Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.ports.ops | toString | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{- define "mlflow-agent.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{/*
The sidecar: one `initContainers` list item. Context: the chart context (`.` here,
`(index .Subcharts "mlflow-agent")` in a parent chart). Example, in a pod template:

  spec:
    terminationGracePeriodSeconds: {{ include "mlflow-agent.terminationGracePeriodSeconds" $agent }}
    securityContext: {{- include "mlflow-agent.podSecurityContext" $agent | nindent 6 }}
    initContainers:
      {{- include "mlflow-agent.sidecar" $agent | nindent 6 }}
    containers:
      - name: train
        env:
          {{- include "mlflow-agent.sidecar.clientEnv" $agent | nindent 10 }}
    volumes:
      {{- include "mlflow-agent.sidecar.volumes" $agent | nindent 6 }}
*/}}
{{- define "mlflow-agent.sidecar" -}}
{{- include "mlflow-agent.validate" (dict "ctx" . "mode" "sidecar") -}}
- {{ include "mlflow-agent.container" (dict "ctx" . "mode" "sidecar") | trim | indent 2 | trimPrefix "  " }}
{{- end }}

{{- define "mlflow-agent.sidecar.volumes" -}}
{{- include "mlflow-agent.volumes" (dict "ctx" . "mode" "sidecar") | trim }}
{{- end }}

{{/* env list items for the training container: where the sidecar agent listens (and its token, if any). */}}
{{- define "mlflow-agent.sidecar.clientEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ printf "http://127.0.0.1:%d" (int .Values.ports.http) | quote }}
{{- if .Values.ingestToken.existingSecret }}
- name: MLFLOW_TRACKING_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ingestToken.existingSecret | quote }}
      key: {{ .Values.ingestToken.key | quote }}
{{- end }}
{{- end }}
