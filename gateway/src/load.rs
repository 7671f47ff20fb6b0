//! Reading a configuration whole: the file or text parsed, its settings validated
//! ([`crate::config`]), and its policy compiled ([`crate::policy`]), which is how the policy's
//! globs, patterns and keys are checked. Here, above both, so that the configuration does not
//! depend on the policy that is made from it.

use std::path::Path;

use crate::{
    config::{Config, ConfigError, DEFAULT_CONFIG, LoadOptions, RawConfig},
    policy::Policy,
};

impl RawConfig {
    /// Validates every setting and compiles the policy (reading the environment and
    /// resolving host names).
    pub fn validate(self) -> Result<Config, ConfigError> {
        self.validate_with(LoadOptions::default())
    }

    /// Validates as [`RawConfig::validate`] does, reading the environment and resolving host
    /// names only as `opts` allows.
    pub fn validate_with(self, opts: LoadOptions) -> Result<Config, ConfigError> {
        self.validate_compiled(opts).map(|(config, _)| config)
    }

    /// Validates as [`RawConfig::validate_with`] does, and also returns the policy that
    /// validation compiled (a reload swaps it in rather than compiling it a second time).
    pub fn validate_compiled(self, opts: LoadOptions) -> Result<(Config, Policy), ConfigError> {
        let config = self.validate_settings(opts)?;
        let policy = Policy::compile(&config)?;
        Ok((config, policy))
    }
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str::<RawConfig>(text)?.validate()
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file_with(path, LoadOptions::default())
    }

    /// Reads, parses and validates a file as `opts` allows (see [`LoadOptions`]).
    pub fn from_file_with(path: &Path, opts: LoadOptions) -> Result<Self, ConfigError> {
        read(path)?.validate_with(opts)
    }

    /// Reads, parses and validates a file; also returns the policy that validation compiled.
    pub fn from_file_compiled(path: &Path) -> Result<(Self, Policy), ConfigError> {
        read(path)?.validate_compiled(LoadOptions::default())
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        Self::from_toml(DEFAULT_CONFIG).expect("the embedded default configuration is valid")
    }
}

fn read(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(toml::from_str::<RawConfig>(&text)?)
}
