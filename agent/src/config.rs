//! The agent's configuration file (TOML): who the host is, where it stands, what it costs.

use std::path::Path;

use dunes_shared::model::{HostId, Prices, Site, SiteName};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Parse { path: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable host id; defaults to the machine's host name, made valid.
    pub host_id: Option<HostId>,
    #[serde(default)]
    pub site: SiteConfig,
    #[serde(default)]
    pub prices: Prices,
    #[serde(default = "default_security_level")]
    pub security_level: u8,
    /// How long a guest gets to shut down before it is forced off.
    #[serde(default = "default_stop_timeout_secs")]
    pub stop_timeout_secs: u32,
    /// The storage Dunes plans with on this host, in GiB; the free part is this less what the
    /// storage directory holds. Unset: the file system's size and free space.
    #[serde(default)]
    pub storage_capacity_gib: Option<u64>,
    /// Whether the agent builds the service networks the console describes (bridges, VXLAN,
    /// instances' namespaces, the firewall) in its network namespace. Off, it keeps the
    /// addresses the console gives and builds nothing: for agents that share one namespace,
    /// as the demo's do.
    #[serde(default = "default_true")]
    pub service_networks: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: SiteName,
    #[serde(default)]
    pub remote: bool,
    #[serde(default = "default_bandwidth")]
    pub link_bandwidth_mbps: u32,
    #[serde(default = "default_latency")]
    pub link_latency_ms: u32,
    /// The most one disk transfer to or from this site may use of its link, in Mbit/s.
    #[serde(default)]
    pub transfer_limit_mbps: Option<u32>,
    /// The site's own networks (`10.1.0.0/16`): traffic to them stays in the site, as does
    /// traffic to the site's other hosts (the console names them). The rest leaves it.
    #[serde(default)]
    pub networks: Vec<crate::traffic::Network>,
}

/// Longest graceful stop a config may ask for; the console waits a little longer than this
/// for a stop's answer (`dunes_console::engine::STOP_CALL_TIMEOUT`).
pub const STOP_TIMEOUT_SECS_MAX: u32 = 900;

fn default_security_level() -> u8 {
    1
}
fn default_stop_timeout_secs() -> u32 {
    60
}
fn default_bandwidth() -> u32 {
    1000
}
fn default_latency() -> u32 {
    1
}

impl Default for SiteConfig {
    fn default() -> Self {
        let site = Site::default();
        SiteConfig {
            name: site.name,
            remote: site.remote,
            link_bandwidth_mbps: site.link_bandwidth_mbps,
            link_latency_ms: site.link_latency_ms,
            transfer_limit_mbps: site.transfer_limit_mbps,
            networks: Vec::new(),
        }
    }
}

impl From<&SiteConfig> for Site {
    fn from(c: &SiteConfig) -> Site {
        Site {
            name: c.name.clone(),
            remote: c.remote,
            link_bandwidth_mbps: c.link_bandwidth_mbps,
            link_latency_ms: c.link_latency_ms,
            transfer_limit_mbps: c.transfer_limit_mbps,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            host_id: None,
            site: SiteConfig::default(),
            prices: Prices::default(),
            security_level: default_security_level(),
            stop_timeout_secs: default_stop_timeout_secs(),
            storage_capacity_gib: None,
            service_networks: true,
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        if !(1..=STOP_TIMEOUT_SECS_MAX).contains(&config.stop_timeout_secs) {
            return Err(format!(
                "stop_timeout_secs must be between 1 and {STOP_TIMEOUT_SECS_MAX}, not {}",
                config.stop_timeout_secs
            ));
        }
        if config.storage_capacity_gib == Some(0) {
            return Err("storage_capacity_gib must be at least 1".into());
        }
        let p = config.prices;
        if [
            p.per_gb_month_stored,
            p.per_gb_transferred,
            p.per_cpu_hour,
            p.per_gb_memory_hour,
        ]
        .iter()
        .any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err("prices must be finite and not negative".into());
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c = AgentConfig::parse(
            r#"
            host_id = "gva-1"
            security_level = 3
            [site]
            name = "geneva"
            remote = true
            link_bandwidth_mbps = 100
            link_latency_ms = 12
            networks = ["10.1.0.0/16", "fd00::/8"]
            [prices]
            per_gb_month_stored = 0.05
            per_gb_transferred = 0.01
            per_cpu_hour = 0.02
            "#,
        )
        .unwrap();
        assert_eq!(c.host_id.unwrap().as_str(), "gva-1");
        assert!(c.site.remote);
        assert_eq!(
            c.site.networks,
            vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()]
        );
        assert_eq!(c.security_level, 3);
        assert_eq!(c.stop_timeout_secs, 60);
        assert_eq!(c.storage_capacity_gib, None);
        let c = AgentConfig::parse("storage_capacity_gib = 200").unwrap();
        assert_eq!(c.storage_capacity_gib, Some(200));
    }

    #[test]
    fn refuses_bad_values() {
        assert!(
            AgentConfig::parse("host_id = \"Bad Name\"")
                .unwrap_err()
                .contains("invalid host id")
        );
        assert!(AgentConfig::parse("colour = 1").is_err());
        assert!(
            AgentConfig::parse("[prices]\nper_cpu_hour = -1.0")
                .unwrap_err()
                .contains("negative")
        );
        assert!(AgentConfig::parse("").is_ok());
        assert!(
            AgentConfig::parse("stop_timeout_secs = 0")
                .unwrap_err()
                .contains("between 1 and 900")
        );
        assert!(AgentConfig::parse("stop_timeout_secs = 901").is_err());
        assert!(
            AgentConfig::parse("storage_capacity_gib = 0")
                .unwrap_err()
                .contains("at least 1")
        );
        assert!(
            AgentConfig::parse("[site]\nname = \"a\"\nnetworks = [\"10.1.0.0/40\"]")
                .unwrap_err()
                .contains("\"10.1.0.0/40\" is not a network")
        );
    }
}
