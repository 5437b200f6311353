//! Where the config comes from, so it can be loaded again: on SIGHUP, and with new overrides
//! from the admin plane. Every load goes through the validator and the TLS layer's file checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, ConfigError, Overrides, StoreSettings};
use crate::store::{PgSettings, PgStore, SqliteStore, Store, StoreError};

/// The origin of the running config.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// A config with no file (the demo): its text, a label for errors, and the base for
    /// relative paths.
    Text {
        text: String,
        label: String,
        base: PathBuf,
    },
}

impl ConfigSource {
    /// The text, its label for errors, and the base of relative paths.
    fn text(&self) -> Result<(std::borrow::Cow<'_, str>, String, PathBuf), ConfigError> {
        match self {
            ConfigSource::File(p) => {
                let label = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: label.clone(),
                    source,
                })?;
                let base = p.parent().unwrap_or(Path::new(".")).to_owned();
                Ok((text.into(), label, base))
            }
            ConfigSource::Text { text, label, base } => {
                Ok((text.as_str().into(), label.clone(), base.clone()))
            }
        }
    }

    /// The state directory the config names: where its store is.
    pub fn state_dir(&self) -> Result<PathBuf, ConfigError> {
        let (text, label, base) = self.text()?;
        Config::state_dir_in(&text, &label, &base)
    }

    /// The `[store]` and `[node] name` the config names.
    pub fn store_settings(&self) -> Result<(Option<StoreSettings>, Option<String>), ConfigError> {
        let (text, label, base) = self.text()?;
        Config::store_in(&text, &label, &base)
    }

    /// The config with `overrides` on top, checked like a file: the validator's problems and
    /// those of the certificate files it names, in one report.
    pub fn load(&self, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (text, label, base) = self.text()?;
        crate::tls::checked(
            &label,
            Config::from_toml_with(&text, &label, &base, Some(overrides)),
        )
    }
}

/// This node's name: `[node] name`, else the host name.
pub fn node_name(configured: Option<String>) -> String {
    configured.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".to_owned())
    })
}

async fn connect(
    settings: &StoreSettings,
    node: Option<String>,
) -> Result<PgStore, super::RuntimeError> {
    let ca = match &settings.ca {
        Some(p) => crate::tls::load_certs(p)?,
        None => Vec::new(),
    };
    Ok(PgStore::connect(&PgSettings {
        url: settings.url.clone(),
        pool_size: settings.pool_size,
        ca,
        node: node_name(node),
    })
    .await?)
}

/// The policy a node applied last, kept in its state dir when the store is shared, so that it
/// starts from it while the database is down.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct LastKnownGood {
    pub(crate) overrides: Overrides,
    pub(crate) stages: crate::stages::Plans,
    pub(crate) drains: Vec<crate::stages::drain::Drain>,
}

impl LastKnownGood {
    pub(crate) fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("last-known-good.json")
    }

    pub(crate) fn read(state_dir: &Path) -> Option<LastKnownGood> {
        let text = std::fs::read(Self::path(state_dir)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub(crate) fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).unwrap_or_default();
        std::fs::create_dir_all(state_dir)?;
        crate::tls::write_private_atomic(&Self::path(state_dir), &text)
    }
}

/// Opens the store the config names for the running program: the shared PostgreSQL store with
/// `[store]` (not reached yet: a node starts while the database is down), else the SQLite
/// store in the state dir (created, and earlier state files imported).
pub async fn open_store(source: &ConfigSource) -> Result<Arc<dyn Store>, super::RuntimeError> {
    match source.store_settings()? {
        (Some(settings), node) => {
            let ca = match &settings.ca {
                Some(p) => crate::tls::load_certs(p)?,
                None => Vec::new(),
            };
            Ok(Arc::new(PgStore::new(&PgSettings {
                url: settings.url.clone(),
                pool_size: settings.pool_size,
                ca,
                node: node_name(node),
            })?))
        }
        (None, _) => {
            let dir = source.state_dir()?;
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??;
            Ok(Arc::new(store))
        }
    }
}

/// The same store for a report (CLI): nothing is created; `None` when the embedded store was
/// never created in the state dir.
pub async fn open_store_read(
    source: &ConfigSource,
) -> Result<Option<Arc<dyn Store>>, super::RuntimeError> {
    match source.store_settings()? {
        (Some(settings), node) => Ok(Some(Arc::new(connect(&settings, node).await?))),
        (None, _) => Ok(SqliteStore::open_read_only(&source.state_dir()?)?
            .map(|s| Arc::new(s) as Arc<dyn Store>)),
    }
}

/// Reads and validates a config file the way every apply does, with the overrides kept in its
/// store (read-only: nothing is created).
pub fn load(path: &Path) -> Result<Config, super::RuntimeError> {
    let source = ConfigSource::File(path.to_owned());
    let settings = match source.store_settings() {
        Ok(settings) => settings,
        // A bad `[store]` is reported with every other problem the file has.
        Err(e @ crate::config::ConfigError::Invalid { .. }) => {
            return Err(source.load(&Overrides::new()).err().unwrap_or(e).into())
        }
        Err(e) => return Err(e.into()),
    };
    let overrides = match settings {
        (None, _) => match SqliteStore::open_read_only(&source.state_dir()?)? {
            Some(store) => store.overrides_now()?,
            None => Overrides::new(),
        },
        (Some(_), _) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| StoreError::Task(e.to_string()))?;
            rt.block_on(async {
                match open_store_read(&source).await? {
                    Some(store) => Ok::<_, super::RuntimeError>(store.overrides().await?),
                    None => Ok(Overrides::new()),
                }
            })?
        }
    };
    Ok(source.load(&overrides)?)
}
