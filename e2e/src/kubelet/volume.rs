//! Pod volumes on the loopback node: `secret` volumes (and `emptyDir`) as
//! directories under the pod's own run directory, kept current as a kubelet
//! keeps them, and the container paths they are mounted at mapped onto those
//! directories.
//!
//! Processes here share the host's filesystem, so a container path such as
//! `/etc/herald/tls/tls.crt` cannot be mounted. Instead every `command` and
//! `args` entry and every env value that starts with a container's
//! `volumeMounts[].mountPath` (the whole value, or the value after the first
//! `=` of a `--flag=value`) gets that prefix replaced by the volume's local
//! directory (joined with `subPath` if given). `readOnly` is accepted and not
//! enforced; `defaultMode` and `items[].mode` are ignored.
//!
//! A Secret volume is written the way the kubelet's atomic writer does it:
//! the files go into a fresh `..<n>` directory, a `..data` symlink is renamed
//! over to point at it, and each top-level name is a symlink through
//! `..data`; so a reader sees the whole old set or the whole new one, and the
//! paths never change. A missing Secret (not `optional`) keeps the pod from
//! starting until it appears; once mounted, a Secret that disappears leaves
//! the last files in place, as a kubelet does.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, Secret, SecretVolumeSource, Volume};

/// File path (relative to the volume) → contents.
pub(super) type Files = BTreeMap<String, Vec<u8>>;

/// Why a volume cannot be set up; the pod's containers wait with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum VolumeError {
    #[error("MountVolume.SetUp failed for volume {volume:?}: secret {secret:?} not found")]
    MissingSecret { volume: String, secret: String },
    #[error("MountVolume.SetUp failed for volume {volume:?}: secret {secret:?} has no key {key:?}")]
    MissingKey {
        volume: String,
        secret: String,
        key: String,
    },
    #[error("volume {volume:?}: path {path:?} must be relative and must not contain '..'")]
    BadPath { volume: String, path: String },
    #[error("volume {volume:?}: writing {dir}: {cause}")]
    Write {
        volume: String,
        dir: PathBuf,
        cause: String,
    },
}

/// A container path and the local path it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    pub(super) container_path: String,
    pub(super) local: PathBuf,
}

/// The volumes a pod declares that this kubelet sets up: `secret` and
/// `emptyDir`. Others are left out, so their mounts map nothing.
pub(super) fn supported(pod: &Pod) -> impl Iterator<Item = &Volume> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.secret.is_some() || v.empty_dir.is_some())
}

/// The local directory of volume `name` under the pod's directory.
pub(super) fn local_dir(pod_dir: &Path, name: &str) -> PathBuf {
    pod_dir.join("volumes").join(name)
}

/// The container's mounts of supported volumes, longest container path
/// first, so `/etc/a/b` wins over `/etc/a` in [`map_path`].
pub(super) fn mounts(pod: &Pod, container: &Container, pod_dir: &Path) -> Vec<Mount> {
    let mut mounts: Vec<Mount> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| supported(pod).any(|v| v.name == m.name))
        .map(|m| {
            let mut local = local_dir(pod_dir, &m.name);
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                local.push(sub);
            }
            let container_path = m.mount_path.trim_end_matches('/');
            Mount {
                container_path: if container_path.is_empty() {
                    "/".to_owned()
                } else {
                    container_path.to_owned()
                },
                local,
            }
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.container_path.len()));
    mounts
}

/// `value` with a leading mounted container path replaced by its local
/// path; `--flag=value` is mapped on its value. Unchanged otherwise.
pub(super) fn map_path(value: &str, mounts: &[Mount]) -> String {
    if let Some(mapped) = map_prefix(value, mounts) {
        return mapped;
    }
    if let Some((flag, rest)) = value.split_once('=')
        && let Some(mapped) = map_prefix(rest, mounts)
    {
        return format!("{flag}={mapped}");
    }
    value.to_owned()
}

fn map_prefix(value: &str, mounts: &[Mount]) -> Option<String> {
    mounts.iter().find_map(|m| {
        let rest = value.strip_prefix(m.container_path.as_str())?;
        let rest = if m.container_path == "/" {
            rest
        } else if rest.is_empty() {
            ""
        } else {
            rest.strip_prefix('/')?
        };
        let local = if rest.is_empty() {
            m.local.clone()
        } else {
            m.local.join(rest)
        };
        Some(local.display().to_string())
    })
}

/// The files a Secret volume holds: every key, or the `items` asked for
/// under their paths. `secret` is `None` when the Secret does not exist.
///
/// # Errors
/// A missing Secret or key that is not `optional`; an item path that is
/// absolute or climbs out with `..`.
pub(super) fn secret_files(
    volume: &str,
    source: &SecretVolumeSource,
    secret: Option<&Secret>,
) -> Result<Files, VolumeError> {
    let optional = source.optional == Some(true);
    let name = source.secret_name.clone().unwrap_or_default();
    let Some(secret) = secret else {
        return match optional {
            true => Ok(Files::new()),
            false => Err(VolumeError::MissingSecret {
                volume: volume.to_owned(),
                secret: name,
            }),
        };
    };
    let mut data: Files = secret
        .string_data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (key, value) in secret.data.iter().flatten() {
        data.insert(key.clone(), value.0.clone());
    }
    let Some(items) = &source.items else {
        return Ok(data);
    };
    let mut files = Files::new();
    for item in items {
        if !relative_inside(&item.path) {
            return Err(VolumeError::BadPath {
                volume: volume.to_owned(),
                path: item.path.clone(),
            });
        }
        match data.get(&item.key) {
            Some(value) => {
                files.insert(item.path.clone(), value.clone());
            }
            None if optional => {}
            None => {
                return Err(VolumeError::MissingKey {
                    volume: volume.to_owned(),
                    secret: name,
                    key: item.key.clone(),
                });
            }
        }
    }
    Ok(files)
}

fn relative_inside(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Replaces the files in `dir` by `files` at once, as the kubelet's atomic
/// writer does: a new `..<version>` directory, then `..data` renamed to
/// point at it; top-level names are symlinks through `..data`, made once,
/// and those no longer in `files` removed; the previous version is removed
/// last.
///
/// # Errors
/// Any filesystem error.
pub(super) fn write_atomically(dir: &Path, files: &Files, version: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("..data");
    let previous = std::fs::read_link(&data).ok();
    let name = format!("..{version}");
    let target = dir.join(&name);
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::create_dir(&target)?;
    for (path, contents) in files {
        let file = target.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, contents)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)?;
    std::fs::rename(&tmp, &data)?;

    let top: std::collections::BTreeSet<&str> =
        files.keys().filter_map(|p| p.split('/').next()).collect();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if !file_name.starts_with("..") && !top.contains(file_name.as_ref()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for name in top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link)?;
        }
    }
    if let Some(previous) = previous.filter(|p| *p != Path::new(&name)) {
        let _ = std::fs::remove_dir_all(dir.join(previous));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(container_path: &str, local: &str) -> Mount {
        Mount {
            container_path: container_path.to_owned(),
            local: PathBuf::from(local),
        }
    }

    #[test]
    fn paths_under_a_mount_are_mapped() {
        let mounts = [
            mount("/etc/tls/extra", "/run/p/volumes/extra"),
            mount("/etc/tls", "/run/p/volumes/tls"),
        ];
        let map = |v: &str| map_path(v, &mounts);
        assert_eq!(map("/etc/tls/tls.crt"), "/run/p/volumes/tls/tls.crt");
        assert_eq!(map("/etc/tls"), "/run/p/volumes/tls");
        assert_eq!(map("/etc/tls/extra/ca.crt"), "/run/p/volumes/extra/ca.crt");
        assert_eq!(
            map("--tls-key=/etc/tls/tls.key"),
            "--tls-key=/run/p/volumes/tls/tls.key"
        );
        // Not under a mount: a longer name, another path, a relative one,
        // a flag whose value is elsewhere.
        assert_eq!(map("/etc/tlsx/a"), "/etc/tlsx/a");
        assert_eq!(map("/etc/other"), "/etc/other");
        assert_eq!(map("etc/tls/a"), "etc/tls/a");
        assert_eq!(map("--x=/var/a"), "--x=/var/a");
        assert_eq!(map("comet"), "comet");
    }

    #[test]
    fn mounts_come_from_supported_volumes_longest_first_with_sub_path() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {
                "volumes": [
                    {"name": "tls", "secret": {"secretName": "cert"}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "cm", "configMap": {"name": "x"}},
                ],
                "containers": [{"name": "c", "volumeMounts": [
                    {"name": "tls", "mountPath": "/etc/tls/", "readOnly": true},
                    {"name": "tls", "mountPath": "/etc/tls/inner/key.pem", "subPath": "tls.key"},
                    {"name": "scratch", "mountPath": "/tmp/s"},
                    {"name": "cm", "mountPath": "/etc/cm"},
                ]}],
            },
        }))
        .unwrap();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let mounts = mounts(&pod, container, Path::new("/run/p"));
        assert_eq!(
            mounts,
            [
                mount("/etc/tls/inner/key.pem", "/run/p/volumes/tls/tls.key"),
                mount("/etc/tls", "/run/p/volumes/tls"),
                mount("/tmp/s", "/run/p/volumes/scratch"),
            ]
        );
        assert_eq!(
            map_path("/etc/tls/inner/key.pem", &mounts),
            "/run/p/volumes/tls/tls.key"
        );
    }

    fn secret(data: serde_json::Value) -> Secret {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}, "stringData": data}))
            .unwrap()
    }

    fn source(value: serde_json::Value) -> SecretVolumeSource {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn secret_files_take_every_key_or_the_items() {
        let s = secret(serde_json::json!({"tls.crt": "C", "tls.key": "K"}));
        let all = secret_files(
            "v",
            &source(serde_json::json!({"secretName": "s"})),
            Some(&s),
        );
        assert_eq!(
            all.unwrap().keys().collect::<Vec<_>>(),
            ["tls.crt", "tls.key"]
        );
        let items = source(serde_json::json!({"secretName": "s",
            "items": [{"key": "tls.crt", "path": "certs/server.pem"}]}));
        let files = secret_files("v", &items, Some(&s)).unwrap();
        assert_eq!(
            files,
            Files::from([("certs/server.pem".into(), b"C".to_vec())])
        );
    }

    #[test]
    fn missing_secrets_and_keys_fail_unless_optional() {
        let plain = source(serde_json::json!({"secretName": "s"}));
        assert_eq!(
            secret_files("v", &plain, None),
            Err(VolumeError::MissingSecret {
                volume: "v".into(),
                secret: "s".into()
            })
        );
        let optional = source(serde_json::json!({"secretName": "s", "optional": true}));
        assert_eq!(secret_files("v", &optional, None), Ok(Files::new()));
        let s = secret(serde_json::json!({"a": "1"}));
        let items = source(serde_json::json!({"secretName": "s",
            "items": [{"key": "b", "path": "b"}]}));
        assert!(matches!(
            secret_files("v", &items, Some(&s)),
            Err(VolumeError::MissingKey { .. })
        ));
        let climbing = source(serde_json::json!({"secretName": "s",
            "items": [{"key": "a", "path": "../a"}]}));
        assert!(matches!(
            secret_files("v", &climbing, Some(&s)),
            Err(VolumeError::BadPath { .. })
        ));
    }

    #[test]
    fn atomic_writes_swap_data_and_keep_paths() {
        let dir = std::env::temp_dir().join(format!("herald-volume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Files::from([("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]);
        write_atomically(&dir, &first, 1).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        assert_eq!(
            std::fs::read_link(dir.join("a")).unwrap(),
            Path::new("..data/a")
        );
        let second = Files::from([("a".into(), b"3".to_vec())]);
        write_atomically(&dir, &second, 2).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"3");
        assert!(
            std::fs::symlink_metadata(dir.join("b")).is_err(),
            "b removed"
        );
        assert!(!dir.join("..1").exists(), "previous version removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
