{{/* Chart name, truncated to 63 characters. */}}
{{- define "lightningdit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name. */}}
{{- define "lightningdit.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lightningdit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lightningdit.labels" -}}
helm.sh/chart: {{ include "lightningdit.chart" . }}
{{ include "lightningdit.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "lightningdit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lightningdit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: include "lightningdit.componentSelector" (list . "api") */}}
{{- define "lightningdit.componentSelector" -}}
{{ include "lightningdit.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "lightningdit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lightningdit.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lightningdit.image" -}}
{{- $flavor := ternary "gpu" "cpu" .Values.worker.gpu.enabled }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavor) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Redis: URL, password Secret name and key, host:port for KEDA. */}}
{{- define "lightningdit.redisHost" -}}
{{- printf "%s-redis" (include "lightningdit.fullname" .) }}
{{- end }}

{{- define "lightningdit.redisUrl" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s:6379/0" (include "lightningdit.redisHost" .) }}
{{- else }}
{{- required "redis.external.url is required when redis.bundled.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{- define "lightningdit.redisSecretName" -}}
{{- if .Values.redis.bundled.enabled }}
{{- .Values.redis.bundled.auth.existingSecret | default (printf "%s-redis" (include "lightningdit.fullname" .)) }}
{{- else }}
{{- required "redis.external.passwordSecret.name is required with an external Redis" .Values.redis.external.passwordSecret.name }}
{{- end }}
{{- end }}

{{- define "lightningdit.redisSecretKey" -}}
{{- if .Values.redis.bundled.enabled }}
{{- .Values.redis.bundled.auth.key }}
{{- else }}
{{- .Values.redis.external.passwordSecret.key }}
{{- end }}
{{- end }}

{{- define "lightningdit.redisPasswordPath" -}}
/var/run/secrets/lightningdit/redis/password
{{- end }}

{{- define "lightningdit.apiKeysPath" -}}
/var/run/secrets/lightningdit/api-keys/keys
{{- end }}

{{/*
The LDIT_ settings every container loads: the user's .Values.config plus the values the chart
owns. A null renders as an empty string.
*/}}
{{- define "lightningdit.settings" -}}
{{- $s := dict }}
{{- range $k, $v := .Values.config }}
{{- $_ := set $s $k $v }}
{{- end }}
{{- if kindIs "invalid" .Values.config.preferred_batch_size }}
{{- $_ := set $s "preferred_batch_size" .Values.config.max_batch_size }}
{{- end }}
{{- $_ := set $s "host" "0.0.0.0" }}
{{- $_ := set $s "port" 8000 }}
{{- $_ := set $s "redis_url" (include "lightningdit.redisUrl" .) }}
{{- $_ := set $s "redis_password_file" (include "lightningdit.redisPasswordPath" .) }}
{{- $_ := set $s "model_dir" .Values.model.dir }}
{{- $_ := set $s "engine_dir" "/engines" }}
{{- $_ := set $s "batch_dir" "/batches" }}
{{- $_ := set $s "api_keys_file" (ternary (include "lightningdit.apiKeysPath" .) "" (ne .Values.api.apiKeys.existingSecret "")) }}
{{- $_ := set $s "worker_name" "" }}
{{- range $k := keys $s | sortAlpha }}
{{- $v := index $s $k }}
LDIT_{{ upper $k }}: {{ include "lightningdit.envValue" $v }}
{{- end }}
{{- end }}

{{/* Volumes shared by api and worker pods. */}}
{{- define "lightningdit.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: redis-password
  secret:
    secretName: {{ include "lightningdit.redisSecretName" . }}
    items:
      - key: {{ include "lightningdit.redisSecretKey" . }}
        path: password
{{- with .Values.model.volume }}
- name: models
  {{- toYaml . | nindent 2 }}
{{- end }}
- name: batches
  {{- toYaml .Values.batches.volume | nindent 2 }}
{{- end }}

{{- define "lightningdit.commonMounts" -}}
- name: tmp
  mountPath: /tmp
- name: redis-password
  mountPath: /var/run/secrets/lightningdit/redis
  readOnly: true
{{- if .Values.model.volume }}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
- name: batches
  mountPath: /batches
{{- end }}

{{/* One setting as a quoted env value: null -> "", whole floats without exponent (1e+06). */}}
{{- define "lightningdit.envValue" -}}
{{- if kindIs "invalid" . }}
{{- quote "" }}
{{- else if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- int64 . | toString | quote }}
{{- else }}
{{- toString . | quote }}
{{- end }}
{{- end }}
