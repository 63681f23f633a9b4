//! Setting up the pod's volumes before its containers start, and keeping
//! its Secret volumes current while it runs (see `kubelet::volume`).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use tokio::time::Instant;
use tracing::{info, warn};

use super::super::volume::{self, Files, VolumeError};
use super::PodTask;

/// How often Secret volumes are compared with their Secrets. A real kubelet
/// takes up to about a minute (its sync period plus its cache); the test
/// bed is quicker so tests wait seconds, not minutes.
const VOLUME_SYNC: Duration = Duration::from_secs(1);

/// The pod's volumes: what each Secret volume holds now, and whether every
/// volume has been set up once.
#[derive(Debug, Default)]
pub(super) struct Volumes {
    written: BTreeMap<String, Files>,
    /// Why the volumes are not all set up yet; `None` once they are.
    problem: Option<String>,
    mounted: bool,
    next_sync: Option<Instant>,
    version: u64,
}

impl Volumes {
    /// Why containers cannot start yet; `None` once every volume is set up.
    pub(super) fn not_mounted(&self) -> Option<String> {
        match self.mounted {
            true => None,
            false => Some(
                self.problem
                    .clone()
                    .unwrap_or_else(|| "volumes not set up yet".to_owned()),
            ),
        }
    }

    pub(super) fn next_sync(&self) -> Option<Instant> {
        self.next_sync
    }
}

impl PodTask {
    /// Sets the volumes up, or refreshes the Secret ones, when due.
    pub(super) async fn sync_volumes_due(&mut self) {
        let now = Instant::now();
        if self.volumes.next_sync.is_some_and(|t| t > now) {
            return;
        }
        self.volumes.next_sync = Some(now + VOLUME_SYNC);
        match self.sync_volumes().await {
            Ok(()) => {
                if !self.volumes.mounted {
                    self.volumes.mounted = true;
                    self.volumes.problem = None;
                }
            }
            // Mounted once: the files in place stay, as with a kubelet.
            Err(message) if self.volumes.mounted => {
                warn!(pod = %self.name, %message, "cannot refresh a volume; keeping its files");
            }
            Err(message) => {
                if self.volumes.problem.as_ref() != Some(&message) {
                    warn!(pod = %self.name, %message, "volume not ready; containers wait");
                }
                self.volumes.problem = Some(message);
            }
        }
    }

    async fn sync_volumes(&mut self) -> Result<(), String> {
        let volumes: Vec<_> = volume::supported(&self.pod).cloned().collect();
        for spec in volumes {
            let dir = volume::local_dir(&self.dir, &spec.name);
            let Some(source) = &spec.secret else {
                // emptyDir: a directory of the pod's own.
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("volume {:?}: {}: {e}", spec.name, dir.display()))?;
                continue;
            };
            let secret = self.fetch_secret(source.secret_name.as_deref()).await?;
            let files = volume::secret_files(&spec.name, source, secret.as_ref())
                .map_err(|e| e.to_string())?;
            if self.volumes.written.get(&spec.name) == Some(&files) {
                continue;
            }
            self.volumes.version += 1;
            volume::write_atomically(&dir, &files, self.volumes.version).map_err(|e| {
                VolumeError::Write {
                    volume: spec.name.clone(),
                    dir: dir.clone(),
                    cause: e.to_string(),
                }
                .to_string()
            })?;
            info!(pod = %self.name, volume = %spec.name, files = files.len(), "secret volume written");
            self.volumes.written.insert(spec.name.clone(), files);
        }
        Ok(())
    }

    async fn fetch_secret(&self, name: Option<&str>) -> Result<Option<Secret>, String> {
        let name = name.unwrap_or_default();
        Api::<Secret>::namespaced(self.shared.client.clone(), &self.namespace)
            .get_opt(name)
            .await
            .map_err(|e| format!("get Secret {name}: {e}"))
    }
}
