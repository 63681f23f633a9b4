{{/*
What the operator does in a namespace it watches, one rule per kind with the
verbs it calls and no others (docs/kubernetes.md, "RBAC"). Children are
written by server-side apply (patch, and create for one that does not exist
yet); the Controller lists and watches every kind it owns; get only where a
pass reads one object back. Deleted: a drained comet pod, an emptied old
ReplicaSet or a comet Deployment left from rollout.strategy Deployment, and
NetworkPolicies turned off; the rest go with their PushCluster through owner
references. e2e/tests/herald_chart.rs checks these rules are exactly what
the operator calls.
*/}}
{{- define "herald.operatorRules" -}}
# Read and watch the PushClusters it reconciles; update and patch only touch
# metadata.finalizers (the teardown that drains comets first).
- apiGroups: [herald.dev]
  resources: [pushclusters]
  verbs: [get, list, watch, update, patch]
# Report observed state, conditions and per-comet load (server-side apply).
- apiGroups: [herald.dev]
  resources: [pushclusters/status]
  verbs: [patch]
# Autoscaling sets the comet count through /scale, the same door HPA/KEDA use.
- apiGroups: [herald.dev]
  resources: [pushclusters/scale]
  verbs: [patch]
# The logic and job Deployments it owns (read back to see a rollout's
# progress), and the comets' ReplicaSets (one per pod-template revision: a
# rollout drains the old one's comets one by one, then deletes it; a comet
# Deployment left from `rollout.strategy: Deployment` goes the same way).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [list, watch, create, patch, delete]
# The NetworkPolicies that keep each internal port to its callers (removed
# again when a spec turns them off).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create, patch, delete]
# Services of each component and the node-list and settings ConfigMaps
# (the comet Service and the node list are read back), and the
# ServiceAccount the components run as (only written).
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [list, watch, create, patch]
# Secrets: reads the ones a spec references, creates the generated API-key
# Secret once; never updates or deletes one.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create]
# The Role + RoleBinding that let logic and job read the node-list
# ConfigMap. Creating a Role needs the operator to hold what it grants
# (configmaps get/list/watch, above); no escalate or bind verbs.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [list, watch, create, patch]
# PodDisruptionBudgets for comet and logic.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch]
# Comet pods: listed by label to poll their load, annotated with
# pod-deletion-cost so the drained comet is the one a scale-down removes,
# and deleted once drained. Never created.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch, delete]
# Events about what it changed (scaling, draining, invalid specs); patch
# updates the count of a repeated event.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
