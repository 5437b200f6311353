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
    /// The config with `overrides` on top, checked like a file.
    pub fn load(&self, overrides: &Overrides) -> Result<Config, ConfigError> {
        self.load_with(Some(overrides))
    }

    /// The config with the overrides kept in its state directory on top.
    pub fn load_saved(&self) -> Result<Config, ConfigError> {
        self.load_with(None)
    }

    fn load_with(&self, overrides: Option<&Overrides>) -> Result<Config, ConfigError> {
        match self {
            ConfigSource::File(p) => {
                let label = p.display().to_string();
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: label.clone(),
                    source,
                })?;
                let base = p.parent().unwrap_or(Path::new("."));
                crate::tls::checked(
                    &label,
                    Config::from_toml_with(&text, &label, base, overrides),
                )
            }
            ConfigSource::Text { text, label, base } => {
                crate::tls::checked(label, Config::from_toml_with(text, label, base, overrides))
            }
        }
    }
}

/// Reads and validates a config file the way every apply does: the validator's problems and
/// those of the certificate files it names, in one report.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    ConfigSource::File(path.to_owned()).load_saved()
}
