//! A container's environment and command line, resolved the way kubelet does:
//! the Service link variables of the pod's namespace first
//! (`<NAME>_SERVICE_HOST`, ...: the portable way to reach a Service without
//! cluster DNS, which the test bed lacks), then `envFrom`, then `env` in order, where each value may use `$(NAME)`
//! references to variables defined before it, and `command`/`args` may use
//! all of them. `$$` is a literal `$`; a reference to an unknown name stays as
//! written, exactly as in Kubernetes.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Container, ObjectFieldSelector, Pod, Service};

/// Why a container's environment cannot be built. The pod waits with reason
/// `CreateContainerConfigError` and the message, as with a real kubelet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum EnvError {
    #[error("env {var}: fieldRef {path} is not supported by the loopback kubelet")]
    UnsupportedField { var: String, path: String },
    #[error("env {var}: resourceFieldRef and fileKeyRef are not supported by the loopback kubelet")]
    UnsupportedSource { var: String },
    #[error("env {var}: {kind} {name} has no key {key}")]
    MissingKey {
        var: String,
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("{kind} {name} not found")]
    MissingObject { kind: &'static str, name: String },
}

/// ConfigMap and Secret data the environment refers to, fetched beforehand
/// (`None` when the object does not exist).
#[derive(Debug, Default)]
pub(super) struct Sources {
    /// The Service link variables ([`service_links`]), defined before the rest.
    pub(super) service_links: Vec<(String, String)>,
    pub(super) config_maps: HashMap<String, Option<BTreeMap<String, String>>>,
    pub(super) secrets: HashMap<String, Option<BTreeMap<String, String>>>,
}

/// The names of the ConfigMaps and Secrets a container's environment uses.
pub(super) fn referenced_sources(container: &Container) -> (Vec<String>, Vec<String>) {
    let (mut config_maps, mut secrets) = (Vec::new(), Vec::new());
    for from in container.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            config_maps.push(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.push(r.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        if let Some(r) = &from.config_map_key_ref {
            config_maps.push(r.name.clone());
        }
        if let Some(r) = &from.secret_key_ref {
            secrets.push(r.name.clone());
        }
    }
    config_maps.sort();
    config_maps.dedup();
    secrets.sort();
    secrets.dedup();
    (config_maps, secrets)
}

/// The addresses a pod has once the harness runs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct PodAddrs<'a> {
    pub(super) pod_ip: &'a str,
    pub(super) host_ip: &'a str,
}

/// The environment of `container`, in definition order (later entries win).
///
/// # Errors
/// A reference the harness cannot resolve (see [`EnvError`]).
pub(super) fn container_env(
    pod: &Pod,
    container: &Container,
    addrs: PodAddrs<'_>,
    sources: &Sources,
) -> Result<Vec<(String, String)>, EnvError> {
    let mut env: Vec<(String, String)> = sources.service_links.clone();
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(r) = &from.config_map_ref {
            let data = sources.config_maps.get(&r.name).cloned().flatten();
            ("ConfigMap", &r.name, r.optional, data)
        } else if let Some(r) = &from.secret_ref {
            let data = sources.secrets.get(&r.name).cloned().flatten();
            ("Secret", &r.name, r.optional, data)
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (key, value) in data {
                    set(&mut env, format!("{prefix}{key}"), value);
                }
            }
            None if optional == Some(true) => {}
            None => {
                return Err(EnvError::MissingObject {
                    kind,
                    name: name.clone(),
                });
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => {
                let lookup = |name: &str| lookup(&env, name);
                expand(var.value.as_deref().unwrap_or_default(), lookup)
            }
            Some(from) => {
                if let Some(field) = &from.field_ref {
                    field_value(pod, field, addrs).ok_or_else(|| EnvError::UnsupportedField {
                        var: var.name.clone(),
                        path: field.field_path.clone(),
                    })?
                } else if let Some(r) = &from.config_map_key_ref {
                    let data = sources.config_maps.get(&r.name).cloned().flatten();
                    match key_value(&var.name, "ConfigMap", &r.name, &r.key, r.optional, data)? {
                        Some(value) => value,
                        None => continue,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let data = sources.secrets.get(&r.name).cloned().flatten();
                    match key_value(&var.name, "Secret", &r.name, &r.key, r.optional, data)? {
                        Some(value) => value,
                        None => continue,
                    }
                } else {
                    return Err(EnvError::UnsupportedSource {
                        var: var.name.clone(),
                    });
                }
            }
        };
        set(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

/// The variables kubelet defines for every Service of the pod's namespace
/// that has a ClusterIP (`enableServiceLinks`, on by default): for Service
/// `chat-comet` with ports `tcp` 3101 and `ws` 3102, `CHAT_COMET_SERVICE_HOST`,
/// `CHAT_COMET_SERVICE_PORT` (the first port), `CHAT_COMET_SERVICE_PORT_TCP`,
/// `CHAT_COMET_SERVICE_PORT_WS`, and the Docker-link form
/// `CHAT_COMET_PORT=tcp://<ip>:3101` and `CHAT_COMET_PORT_3101_TCP_ADDR`, ...
pub(super) fn service_links(services: &[Service]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None")
        else {
            continue;
        };
        let prefix = service
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .to_uppercase()
            .replace('-', "_");
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        env.push((format!("{prefix}_SERVICE_HOST"), ip.to_owned()));
        env.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for port in ports {
            if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                let name = name.to_uppercase().replace('-', "_");
                env.push((
                    format!("{prefix}_SERVICE_PORT_{name}"),
                    port.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.as_deref().unwrap_or("TCP").to_owned()
        };
        env.push((
            format!("{prefix}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for port in ports {
            let (number, proto) = (port.port, proto(port));
            let var = format!("{prefix}_PORT_{number}_{proto}");
            env.push((
                var.clone(),
                format!("{}://{ip}:{number}", proto.to_lowercase()),
            ));
            env.push((format!("{var}_PROTO"), proto.to_lowercase()));
            env.push((format!("{var}_PORT"), number.to_string()));
            env.push((format!("{var}_ADDR"), ip.to_owned()));
        }
    }
    env
}

/// One key of a ConfigMap or Secret; `Ok(None)` when it is optional and absent.
fn key_value(
    var: &str,
    kind: &'static str,
    name: &str,
    key: &str,
    optional: Option<bool>,
    data: Option<BTreeMap<String, String>>,
) -> Result<Option<String>, EnvError> {
    match data.and_then(|mut data| data.remove(key)) {
        Some(value) => Ok(Some(value)),
        None if optional == Some(true) => Ok(None),
        None => Err(EnvError::MissingKey {
            var: var.to_owned(),
            kind,
            name: name.to_owned(),
            key: key.to_owned(),
        }),
    }
}

fn lookup<'e>(env: &'e [(String, String)], name: &str) -> Option<&'e str> {
    env.iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The downward-API fields kubelet offers through `fieldRef`.
fn field_value(pod: &Pod, field: &ObjectFieldSelector, addrs: PodAddrs<'_>) -> Option<String> {
    let path = field.field_path.as_str();
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    // metadata.labels['key'] / metadata.annotations['key']
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")
            .map(str::to_owned)
    };
    if let Some(key) = subscript("metadata.labels") {
        return Some(meta.labels.as_ref()?.get(&key).cloned().unwrap_or_default());
    }
    if let Some(key) = subscript("metadata.annotations") {
        return Some(
            meta.annotations
                .as_ref()?
                .get(&key)
                .cloned()
                .unwrap_or_default(),
        );
    }
    Some(match path {
        "metadata.name" => meta.name.clone()?,
        "metadata.namespace" => meta.namespace.clone()?,
        "metadata.uid" => meta.uid.clone()?,
        "spec.nodeName" => spec?.node_name.clone()?,
        "spec.serviceAccountName" => spec?.service_account_name.clone().unwrap_or_default(),
        "status.podIP" | "status.podIPs" => addrs.pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => addrs.host_ip.to_owned(),
        _ => return None,
    })
}

/// Replaces `$(NAME)` with `lookup(NAME)` where it is defined; `$$` becomes
/// `$`; anything else is kept as written.
pub fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(close) => {
                    let name = &inner[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[close + 1..];
                }
                None => {
                    // Unterminated: kept literally, like kubelet.
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    #[test]
    fn expands_like_kubelet() {
        let vars = [("POD_IP", "127.0.20.1"), ("EMPTY", "")];
        let lookup = env_lookup(&vars);
        assert_eq!(
            expand("--tcp-addr=$(POD_IP):3101", &lookup),
            "--tcp-addr=127.0.20.1:3101"
        );
        assert_eq!(expand("$$(POD_IP)", &lookup), "$(POD_IP)");
        assert_eq!(expand("$$$(POD_IP)", &lookup), "$127.0.20.1");
        assert_eq!(expand("$(UNKNOWN)", &lookup), "$(UNKNOWN)");
        assert_eq!(expand("a$(EMPTY)b", &lookup), "ab");
        assert_eq!(expand("$(POD_IP", &lookup), "$(POD_IP");
        assert_eq!(expand("cost $5", &lookup), "cost $5");
        assert_eq!(expand("end$", &lookup), "end$");
        assert_eq!(expand("ünï$(POD_IP)cødé", &lookup), "ünï127.0.20.1cødé");
    }

    #[test]
    fn service_links_are_named_as_kubelet_names_them() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "chat-comet"},
             "spec": {"clusterIP": "127.100.0.9", "ports": [
                 {"name": "tcp", "port": 3101, "protocol": "TCP"},
                 {"name": "ws", "port": 3102}]}},
            {"metadata": {"name": "chat-comet-grpc"},
             "spec": {"clusterIP": "None", "ports": [{"name": "grpc", "port": 3109}]}},
        ]))
        .unwrap();
        let env = service_links(&services);
        let get = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(get("CHAT_COMET_SERVICE_HOST"), Some("127.100.0.9"));
        assert_eq!(get("CHAT_COMET_SERVICE_PORT"), Some("3101"));
        assert_eq!(get("CHAT_COMET_SERVICE_PORT_WS"), Some("3102"));
        assert_eq!(get("CHAT_COMET_PORT"), Some("tcp://127.100.0.9:3101"));
        assert_eq!(get("CHAT_COMET_PORT_3102_TCP_ADDR"), Some("127.100.0.9"));
        // Headless Services have no link variables.
        assert!(!env.iter().any(|(n, _)| n.starts_with("CHAT_COMET_GRPC")));
        // They are defined first, so `env` may refer to them.
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "main", "env": [
                {"name": "COMET", "value": "$(CHAT_COMET_SERVICE_HOST):$(CHAT_COMET_SERVICE_PORT_TCP)"}]}]}
        }))
        .unwrap();
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        let sources = Sources {
            service_links: env,
            ..Sources::default()
        };
        let addrs = PodAddrs {
            pod_ip: "127.0.20.1",
            host_ip: "127.0.0.1",
        };
        let built = container_env(&pod, &container, addrs, &sources).unwrap();
        assert_eq!(
            built.last(),
            Some(&("COMET".to_owned(), "127.100.0.9:3101".to_owned()))
        );
    }

    fn pod() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "ns", "uid": "u-1",
                          "labels": {"app": "web"}},
            "spec": {"nodeName": "loopback-0", "containers": [{
                "name": "main",
                "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                "env": [
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "ADDR", "value": "$(POD_IP):3101"},
                    {"name": "LATER", "value": "$(NEXT)"},
                    {"name": "NEXT", "value": "x"},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "pw"}}},
                    {"name": "MAYBE", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "nope", "optional": true}}}
                ]
            }]}
        }))
        .expect("pod fixture")
    }

    #[test]
    fn resolves_fields_sources_and_references() {
        let pod = pod();
        let container = &pod.spec.as_ref().expect("spec").containers[0];
        assert_eq!(
            referenced_sources(container),
            (vec!["cfg".to_owned()], vec!["creds".to_owned()])
        );
        let mut sources = Sources::default();
        sources.config_maps.insert(
            "cfg".to_owned(),
            Some([("mode".to_owned(), "fast".to_owned())].into()),
        );
        sources.secrets.insert(
            "creds".to_owned(),
            Some([("pw".to_owned(), "s3cret".to_owned())].into()),
        );
        let addrs = PodAddrs {
            pod_ip: "127.0.20.3",
            host_ip: "127.0.0.1",
        };
        let env = container_env(&pod, container, addrs, &sources).expect("env");
        let get = |name: &str| lookup(&env, name).map(str::to_owned);
        assert_eq!(get("CFG_mode").as_deref(), Some("fast"));
        assert_eq!(get("POD_IP").as_deref(), Some("127.0.20.3"));
        assert_eq!(get("POD_NAME").as_deref(), Some("web-1"));
        assert_eq!(get("POD_NAMESPACE").as_deref(), Some("ns"));
        assert_eq!(get("HOST_IP").as_deref(), Some("127.0.0.1"));
        assert_eq!(get("APP").as_deref(), Some("web"));
        assert_eq!(get("ADDR").as_deref(), Some("127.0.20.3:3101"));
        // Only earlier variables can be referenced.
        assert_eq!(get("LATER").as_deref(), Some("$(NEXT)"));
        assert_eq!(get("PASSWORD").as_deref(), Some("s3cret"));
        assert_eq!(get("MAYBE"), None);

        sources.secrets.insert("creds".to_owned(), None);
        let err = container_env(&pod, container, addrs, &sources).expect_err("secret missing");
        assert!(matches!(err, EnvError::MissingKey { .. }), "{err}");
    }
}
