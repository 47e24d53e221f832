{{/* Names. */}}
{{- define "surge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "surge.fullname" -}}
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

{{/*
The RayCluster's name. KubeRay names the head Service "<name>-head-svc" and cuts any name longer
than 50 characters from the front (and replaces a leading digit): at most 41 characters keep the
Service name predictable.
*/}}
{{- define "surge.rayClusterName" -}}
{{- include "surge.fullname" . | trunc 41 | trimSuffix "-" }}
{{- end }}

{{- define "surge.rayHeadService" -}}
{{- $svc := printf "%s-head-svc" (include "surge.rayClusterName" .) }}
{{- if regexMatch "^[0-9]" $svc }}
{{- $svc = printf "r%s" (substr 1 -1 $svc) }}
{{- end }}
{{- $svc }}
{{- end }}

{{- define "surge.rayJobsAddress" -}}
{{- .Values.gateway.rayJobsAddress | default (printf "http://%s:8265" (include "surge.rayHeadService" .)) }}
{{- end }}

{{- define "surge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "surge.labels" -}}
helm.sh/chart: {{ include "surge.chart" . }}
{{ include "surge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "surge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "surge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "surge.gatewaySelectorLabels" -}}
{{ include "surge.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Images. */}}
{{- define "surge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "surge.gpuImage" -}}
{{- $repo := .Values.gpuWorkers.image.repository | default .Values.image.repository }}
{{- $tag := .Values.gpuWorkers.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* The API token: a Secret the chart writes, or the user's. No default token. */}}
{{- define "surge.apiTokenSecretName" -}}
{{- if .Values.apiToken.existingSecret }}
{{- .Values.apiToken.existingSecret }}
{{- else }}
{{- printf "%s-api-token" (include "surge.fullname" .) }}
{{- end }}
{{- end }}

{{- define "surge.apiTokenSecretKey" -}}
{{- if .Values.apiToken.existingSecret }}{{ .Values.apiToken.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{- define "surge.apiTokenValue" -}}
{{- required "apiToken: the chart has no default API token; set apiToken.value (e.g. --set apiToken.value=$(openssl rand -hex 32)) or apiToken.existingSecret (a Secret holding it under apiToken.existingSecretKey)" .Values.apiToken.value }}
{{- end }}

{{/*
Tokens the chart may generate (Ray's, the ingest token) or take as given (the predict token).
Argument of each helper: dict with root (.), cfg (the token's values: value, existingSecret,
existingSecretKey) and suffix (of the Secret the chart writes: <fullname>-<suffix>).
*/}}
{{- define "surge.secretName" -}}
{{- .cfg.existingSecret | default (printf "%s-%s" (include "surge.fullname" .root) .suffix) }}
{{- end }}

{{- define "surge.secretKey" -}}
{{- if .cfg.existingSecret }}{{ .cfg.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/*
The token a generated Secret holds: the given value, else the one an earlier revision stored (so
that an upgrade keeps the nodes, the gateway and the external solvers agreeing), else a new one.
Only secret.yaml calls it: a second call could draw a different random token.
*/}}
{{- define "surge.generatedToken" -}}
{{- if .cfg.value }}
{{- .cfg.value }}
{{- else }}
{{- $stored := lookup "v1" "Secret" .root.Release.Namespace (include "surge.secretName" .) }}
{{- $previous := dig "data" "token" "" $stored }}
{{- if $previous }}{{ b64dec $previous }}{{ else }}{{ randAlphaNum 32 }}{{ end }}
{{- end }}
{{- end }}

{{- define "surge.rayAuthEnv" -}}
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "surge.secretName" (dict "root" . "cfg" .Values.rayAuth "suffix" "ray-auth") }}
      key: {{ include "surge.secretKey" (dict "cfg" .Values.rayAuth) }}
{{- end }}
{{- end }}

{{/*
Where the Ray pods find the ingest token: a file of a Secret volume, named by SURGE_INGEST_TOKEN_FILE.
A file rather than a variable: the token then never sits in an environment that Ray's job API or
dashboard could show, and a rotated Secret reaches running pods.
*/}}
{{- define "surge.secretsDir" -}}/etc/surge/secrets{{- end }}

{{- define "surge.ingestTokenFile" -}}
{{- printf "%s/ingest-token" (include "surge.secretsDir" .) }}
{{- end }}

{{/* Where the Ray pods find the gRPC TLS pair (grpcTLS.existingSecret), as files. */}}
{{- define "surge.grpcTLSDir" -}}/etc/surge/grpc-tls{{- end }}

{{- define "surge.modelStoreClaim" -}}
{{- .Values.modelStore.existingClaim | default (printf "%s-models" (include "surge.fullname" .)) }}
{{- end }}

{{- define "surge.studiesConfigMap" -}}
{{- printf "%s-studies" (include "surge.fullname" .) }}
{{- end }}

{{/* Security: the image's user (uid 10001), read-only root filesystem, no privileges. */}}
{{- define "surge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "surge.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Environment of every container: writable HOME on the read-only root filesystem, the store, Ray's token. */}}
{{- define "surge.commonEnv" -}}
- name: HOME
  value: /tmp
- name: SURGE_STORE
  value: /models
{{- if .Values.studies.enabled }}
- name: SURGE_CONFIG_DIR
  value: /etc/surge/studies
{{- end }}
{{- include "surge.rayAuthEnv" . }}
{{- end }}

{{- define "surge.commonVolumeMounts" -}}
- name: models
  mountPath: /models
- name: tmp
  mountPath: /tmp
{{- if .Values.studies.enabled }}
- name: studies
  mountPath: /etc/surge/studies
  readOnly: true
{{- end }}
{{- end }}

{{- define "surge.commonVolumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "surge.modelStoreClaim" . }}
- name: tmp
  emptyDir: {}
{{- if .Values.studies.enabled }}
- name: studies
  configMap:
    name: {{ include "surge.studiesConfigMap" . }}
{{- end }}
{{- end }}

{{/*
A Ray pod template (head or worker group). Argument: dict with root (.), group (its values),
nodeType (head|worker), image, gpus (0 for none).

KubeRay runs its generated `ray start` through a login shell (`/bin/bash -lc`) unless told
otherwise, and Debian's /etc/profile resets PATH, which drops the image's virtualenv (where `ray`
is). The ray.io/overwrite-container-cmd annotation makes KubeRay keep this command instead: the
generated command ($KUBERAY_GEN_RAY_START_CMD, built from rayStartParams) in a plain shell under
tini. Containers that KubeRay adds itself get the virtualenv back from ray-profile-configmap.yaml.
*/}}
{{- define "surge.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group -}}
metadata:
  annotations:
    ray.io/overwrite-container-cmd: "true"
    {{- with $g.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "surge.labels" $root | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .nodeType }}
    {{- with $g.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  securityContext:
    {{- include "surge.podSecurityContext" $root | nindent 4 }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: ray-{{ .nodeType }}
      image: {{ .image | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["/usr/bin/tini", "--", "/bin/bash", "-c", "--"]
      args:
        - 'ulimit -n 65536 2>/dev/null; exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"'
      securityContext:
        {{- include "surge.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "surge.commonEnv" $root | nindent 8 }}
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        - name: SURGE_INGEST_TOKEN_FILE
          value: {{ include "surge.ingestTokenFile" $root }}
        {{- if $root.Values.grpcTLS.existingSecret }}
        - name: SURGE_GRPC_TLS_CERT
          value: {{ include "surge.grpcTLSDir" $root }}/tls.crt
        - name: SURGE_GRPC_TLS_KEY
          value: {{ include "surge.grpcTLSDir" $root }}/tls.key
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if eq .nodeType "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: metrics, containerPort: 8080}
      {{- /* KubeRay's default probes call wget, which the image does not have: probe over HTTP. */}}
      {{- if eq .nodeType "head" }}
      readinessProbe:
        httpGet: {path: /api/gcs_healthz, port: 8265}
        initialDelaySeconds: 10
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 10
      livenessProbe:
        httpGet: {path: /api/gcs_healthz, port: 8265}
        initialDelaySeconds: 30
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 120
      {{- else }}
      readinessProbe:
        httpGet: {path: /api/local_raylet_healthz, port: 52365}
        initialDelaySeconds: 10
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 10
      livenessProbe:
        httpGet: {path: /api/local_raylet_healthz, port: 52365}
        initialDelaySeconds: 30
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 120
      {{- end }}
      {{- $resources := deepCopy $g.resources }}
      {{- if gt (int .gpus) 0 }}
      {{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) ($resources.limits | default dict) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        {{- include "surge.commonVolumeMounts" $root | nindent 8 }}
        - name: shm
          mountPath: /dev/shm
        - name: ray-profile
          mountPath: /etc/profile.d/surge-path.sh
          subPath: surge-path.sh
          readOnly: true
        - name: secrets
          mountPath: {{ include "surge.secretsDir" $root }}
          readOnly: true
        {{- if $root.Values.grpcTLS.existingSecret }}
        - name: grpc-tls
          mountPath: {{ include "surge.grpcTLSDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    {{- include "surge.commonVolumes" $root | nindent 4 }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
    - name: ray-profile
      configMap:
        name: {{ include "surge.fullname" $root }}-ray-profile
        defaultMode: 292  # 0444
    - name: secrets
      secret:
        secretName: {{ include "surge.secretName" (dict "root" $root "cfg" $root.Values.ingestToken "suffix" "ingest-token") }}
        items:
          - key: {{ include "surge.secretKey" (dict "cfg" $root.Values.ingestToken) }}
            path: ingest-token
        # 0440: the files belong to root and the pod's fsGroup (10001), the image user's group.
        defaultMode: 288
    {{- with $root.Values.grpcTLS.existingSecret }}
    - name: grpc-tls
      secret:
        secretName: {{ . }}
        items:
          - {key: tls.crt, path: tls.crt}
          - {key: tls.key, path: tls.key}
        defaultMode: 288
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* rayStartParams: the group's extras, then num-cpus (and num-gpus) from values; strings only. */}}
{{- define "surge.rayStartParams" -}}
{{- $p := dict }}
{{- range $k, $v := .group.rayStartParams }}
{{- $_ := set $p $k (include "surge.paramString" $v) }}
{{- end }}
{{- range $k, $v := .fixed }}
{{- $_ := set $p $k $v }}
{{- end }}
{{- if not (kindIs "invalid" .group.numCpus) }}
{{- $_ := set $p "num-cpus" (include "surge.paramString" .group.numCpus) }}
{{- end }}
{{- if gt (int (.gpus | default 0)) 0 }}
{{- $_ := set $p "num-gpus" (include "surge.paramString" .gpus) }}
{{- end }}
{{- toYaml $p }}
{{- end }}

{{/* A value as `ray start` takes it: whole numbers without an exponent (JSON values arrive as floats). */}}
{{- define "surge.paramString" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}
