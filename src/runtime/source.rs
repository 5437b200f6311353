//! Where the config comes from, so it can be loaded again: on SIGHUP, and with new overrides
//! from the admin plane. Every load goes through the validator and the TLS layer's file checks.

use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Overrides};

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

/// Reads and validates a config file the way every apply does, with the overrides kept in its
/// state directory's store (read-only: nothing is created).
pub fn load(path: &Path) -> Result<Config, super::RuntimeError> {
    let source = ConfigSource::File(path.to_owned());
    let overrides = match crate::store::SqliteStore::open_read_only(&source.state_dir()?)? {
        Some(store) => store.overrides_now()?,
        None => Overrides::new(),
    };
    Ok(source.load(&overrides)?)
}
