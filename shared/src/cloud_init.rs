//! cloud-init's NoCloud data for a VM: its meta-data (an instance id that stays with the VM
//! through migrations, and its host name), the operator's user-data checked before anything
//! is made, and the usual case (a user who logs in with an SSH key) written as cloud-config.

use base64::Engine as _;
use saphyr::{LoadableYamlNode as _, YamlOwned};
use serde::{Deserialize, Serialize};

/// What a VM's NoCloud seed holds besides its instance id, which is the VM's UUID (kept
/// wherever the VM goes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInitData {
    /// The guest's host name (meta-data's `local-hostname`).
    pub hostname: String,
    /// Checked with [`check_user_data`].
    pub user_data: String,
    #[serde(default)]
    pub network_config: Option<String>,
}

/// network-config (version 1) that gives the NIC of MAC address `mac` an address by DHCP,
/// as QEMU's user network and most bridges hand them out. The NIC is named by its MAC
/// address (and called eth0), which every renderer of cloud-init takes, Debian's ifupdown
/// among them; a name pattern is not.
pub fn dhcp_network_config(mac: &str) -> String {
    format!(
        "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    mac_address: {}\n    subnets:\n      - type: dhcp\n",
        quoted(mac)
    )
}

/// network-config (version 1) for a NIC on a service network: its address, gateway and
/// MTU fixed, the network's resolver (the gateway) and search domains.
pub fn static_network_config(nic: &crate::network::InstanceNic) -> String {
    let mut out = format!(
        "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    mac_address: {}\n    mtu: {}\n    subnets:\n      - type: static\n        address: {}/{}\n        gateway: {}\n        dns_nameservers: [{}]\n",
        quoted(&nic.mac),
        nic.mtu,
        nic.address,
        nic.prefix_len,
        nic.gateway,
        nic.gateway,
    );
    if !nic.search.is_empty() {
        let search: Vec<String> = nic.search.iter().map(|s| quoted(s)).collect();
        out.push_str(&format!("        dns_search: [{}]\n", search.join(", ")));
    }
    out
}

/// The most user-data a VM gets: cloud-init reads it whole, and it travels in one request.
pub const USER_DATA_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("user-data line {line}: {message}")]
    Yaml { line: usize, message: String },
    #[error("user-data must begin with #cloud-config (a cloud-config document) or #! (a script)")]
    NoHeader,
    #[error("user-data's cloud-config is not a mapping of keys (such as users: or packages:)")]
    NotAMapping,
    #[error("user-data is {0} bytes; it may be at most 64 KiB")]
    TooLarge(usize),
}

/// Checks user-data as cloud-init reads it: a `#cloud-config` document must be YAML whose
/// top level is a mapping; a script (`#!`) is taken as it is.
pub fn check_user_data(text: &str) -> Result<(), UserDataError> {
    if text.len() > USER_DATA_MAX_BYTES {
        return Err(UserDataError::TooLarge(text.len()));
    }
    if text.starts_with("#!") {
        return Ok(());
    }
    if !text.starts_with("#cloud-config") {
        return Err(UserDataError::NoHeader);
    }
    let documents = YamlOwned::load_from_str(text).map_err(|e| UserDataError::Yaml {
        line: e.marker().line(),
        message: e.info().to_string(),
    })?;
    match documents.first() {
        // An empty cloud-config does nothing, as cloud-init takes it.
        None => Ok(()),
        Some(doc) if doc.is_mapping() || doc.is_null() => Ok(()),
        Some(_) => Err(UserDataError::NotAMapping),
    }
}

/// The meta-data of a VM.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        quoted(instance_id),
        quoted(hostname)
    )
}

/// A string as YAML reads it back exactly (YAML takes JSON's double-quoted strings).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshKeyError {
    #[error("not an SSH public key: expected one line such as \"ssh-ed25519 AAAA… you@host\"")]
    NotAKey,
    #[error(
        "SSH keys of type {0} are not taken: use ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256/384/521"
    )]
    Type(String),
    #[error("the SSH key's data is not a {0} key")]
    Body(String),
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// The public key in `text` (an `authorized_keys` line, as `ssh-keygen` writes a `.pub`
/// file), checked: a known type, and data that is a key of that type.
pub fn parse_ssh_key(text: &str) -> Result<String, SshKeyError> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err(SshKeyError::NotAKey);
    };
    let mut fields = line.split_whitespace();
    let (Some(kind), Some(body)) = (fields.next(), fields.next()) else {
        return Err(SshKeyError::NotAKey);
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(if kind.starts_with("ssh-") || kind.starts_with("ecdsa-") {
            SshKeyError::Type(kind.to_string())
        } else {
            SshKeyError::NotAKey
        });
    }
    // The data begins with its own type, as a length-prefixed string.
    let data = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| SshKeyError::Body(kind.to_string()))?;
    let named = data
        .get(..4)
        .map(|n| u32::from_be_bytes(n.try_into().expect("four bytes")) as usize)
        .and_then(|n| data.get(4..4 + n));
    if named != Some(kind.as_bytes()) || data.len() < 4 + kind.len() + 16 {
        return Err(SshKeyError::Body(kind.to_string()));
    }
    Ok(line.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a user name: 1 to 32 lower-case letters, digits, _ or -, starting with a letter or _"
)]
pub struct UserNameError(pub String);

/// cloud-config that makes `user` (with sudo) who logs in with `ssh_key`.
pub fn user_with_key(user: &str, ssh_key: &str) -> Result<String, UserNameError> {
    let valid = (1..=32).contains(&user.len())
        && user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !valid {
        return Err(UserNameError(user.to_string()));
    }
    Ok(format!(
        "#cloud-config\nusers:\n  - name: {}\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    shell: /bin/bash\n    lock_passwd: true\n    ssh_authorized_keys:\n      - {}\n",
        quoted(user),
        quoted(ssh_key)
    ))
}

/// A value a service application's user-data names, written `{{name}}` in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// The instance's VM name (`shop-web-1`).
    Name,
    /// The instance's index within its application.
    Index,
    Service,
    Application,
    /// The addresses of an application's instances (`{{addresses.db}}`), comma-separated.
    Addresses(String),
}

impl Placeholder {
    fn parse(text: &str) -> Option<Placeholder> {
        Some(match text {
            "name" => Placeholder::Name,
            "index" => Placeholder::Index,
            "service" => Placeholder::Service,
            "application" => Placeholder::Application,
            _ => {
                let app = text.strip_prefix("addresses.")?;
                let plain = !app.is_empty()
                    && app
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !plain {
                    return None;
                }
                Placeholder::Addresses(app.to_string())
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstitutionError {
    #[error(
        "user-data line {line}: {{{{{text}}}}} is not a value Dunes fills in: use {{{{name}}}}, {{{{index}}}}, {{{{service}}}}, {{{{application}}}} or {{{{addresses.APP}}}}"
    )]
    Unknown { line: usize, text: String },
    #[error("user-data line {line}: {{{{ is not closed by }}}}")]
    Unclosed { line: usize },
    #[error("user-data line {line}: {message}")]
    Value { line: usize, message: String },
}

/// `template` with each `{{placeholder}}` replaced by what `value` answers for it (spaces
/// inside the braces are allowed). `value`'s refusal comes back with the placeholder's line.
pub fn substitute(
    template: &str,
    mut value: impl FnMut(&Placeholder) -> Result<String, String>,
) -> Result<String, SubstitutionError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let line_of = |rest: &str| {
        template[..template.len() - rest.len()]
            .matches('\n')
            .count()
            + 1
    };
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let line = line_of(&rest[open..]);
        let close = after
            .find("}}")
            .filter(|close| !after[..*close].contains('\n'))
            .ok_or(SubstitutionError::Unclosed { line })?;
        let text = after[..close].trim();
        let placeholder = Placeholder::parse(text).ok_or_else(|| SubstitutionError::Unknown {
            line,
            text: text.to_string(),
        })?;
        out.push_str(
            &value(&placeholder).map_err(|message| SubstitutionError::Value { line, message })?,
        );
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ed25519 public key's data: its type and 32 bytes.
    fn ed25519_line(comment: &str) -> String {
        let mut data = Vec::new();
        data.extend_from_slice(&11u32.to_be_bytes());
        data.extend_from_slice(b"ssh-ed25519");
        data.extend_from_slice(&32u32.to_be_bytes());
        data.extend_from_slice(&[7u8; 32]);
        format!(
            "ssh-ed25519 {} {comment}",
            base64::engine::general_purpose::STANDARD.encode(data)
        )
    }

    #[test]
    fn user_data_is_checked_as_cloud_init_reads_it() {
        assert_eq!(check_user_data("#cloud-config\npackages: [htop]\n"), Ok(()));
        assert_eq!(check_user_data("#cloud-config\n"), Ok(()));
        assert_eq!(check_user_data("#!/bin/sh\necho hi: [\n"), Ok(()));
        assert_eq!(
            check_user_data("packages: [htop]\n"),
            Err(UserDataError::NoHeader)
        );
        assert_eq!(
            check_user_data("#cloud-config\n- a\n- b\n"),
            Err(UserDataError::NotAMapping)
        );
        match check_user_data("#cloud-config\nusers:\n  - name: a\n packages: [x\n") {
            Err(UserDataError::Yaml { line, .. }) => assert!((3..=5).contains(&line), "{line}"),
            other => panic!("{other:?}"),
        }
        let big = format!("#cloud-config\n#{}\n", "x".repeat(USER_DATA_MAX_BYTES));
        assert!(matches!(
            check_user_data(&big),
            Err(UserDataError::TooLarge(_))
        ));
    }

    #[test]
    fn an_ssh_key_is_one_line_of_a_known_type_with_its_data() {
        let line = ed25519_line("ops@laptop");
        assert_eq!(parse_ssh_key(&format!("\n{line}\n")), Ok(line.clone()));
        assert_eq!(parse_ssh_key("hello world"), Err(SshKeyError::NotAKey));
        assert_eq!(parse_ssh_key(""), Err(SshKeyError::NotAKey));
        assert_eq!(
            parse_ssh_key(&format!("{line}\n{line}")),
            Err(SshKeyError::NotAKey)
        );
        assert_eq!(
            parse_ssh_key("ssh-dss AAAAB3NzaC1kc3M= x"),
            Err(SshKeyError::Type("ssh-dss".into()))
        );
        assert_eq!(
            parse_ssh_key("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ== x"),
            Err(SshKeyError::Body("ssh-ed25519".into()))
        );
        assert_eq!(
            parse_ssh_key(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----"
            ),
            Err(SshKeyError::NotAKey)
        );
    }

    #[test]
    fn the_usual_user_reads_back_as_written() {
        let key = ed25519_line("a: comment # with YAML in it");
        let config = user_with_key("debian", &key).unwrap();
        assert_eq!(check_user_data(&config), Ok(()));
        let doc = &YamlOwned::load_from_str(&config).unwrap()[0];
        let user = &doc["users"][0];
        assert_eq!(user["name"].as_str(), Some("debian"));
        assert_eq!(user["ssh_authorized_keys"][0].as_str(), Some(key.as_str()));
        assert!(user_with_key("Root", &key).is_err());
        assert!(user_with_key("", &key).is_err());
        assert!(user_with_key("9lives", &key).is_err());
        let network =
            &YamlOwned::load_from_str(&dhcp_network_config("52:54:00:12:34:56")).unwrap()[0];
        assert_eq!(network["version"].as_integer(), Some(1));
        let nic = &network["config"][0];
        assert_eq!(nic["mac_address"].as_str(), Some("52:54:00:12:34:56"));
        assert_eq!(nic["subnets"][0]["type"].as_str(), Some("dhcp"));
        let meta = meta_data("vm-7f3a", "web-1");
        let doc = &YamlOwned::load_from_str(&meta).unwrap()[0];
        assert_eq!(doc["instance-id"].as_str(), Some("vm-7f3a"));
        assert_eq!(doc["local-hostname"].as_str(), Some("web-1"));
    }
    #[test]
    fn placeholders_are_filled_in_and_unknown_ones_named_with_their_line() {
        let template = "#cloud-config\nhostname: {{name}}\nwrite_files:\n  - path: /etc/db\n    content: \"{{ addresses.db }} {{service}}/{{application}}-{{index}}\"\n";
        let filled = substitute(template, |p| {
            Ok(match p {
                Placeholder::Name => "shop-web-1".into(),
                Placeholder::Index => "1".into(),
                Placeholder::Service => "shop".into(),
                Placeholder::Application => "web".into(),
                Placeholder::Addresses(app) => format!("10.0.0.5,10.0.0.6 of {app}"),
            })
        })
        .unwrap();
        assert_eq!(
            filled,
            "#cloud-config\nhostname: shop-web-1\nwrite_files:\n  - path: /etc/db\n    content: \"10.0.0.5,10.0.0.6 of db shop/web-1\"\n"
        );
        assert_eq!(check_user_data(&filled), Ok(()));
        assert_eq!(
            substitute("no braces", |_| Err("never".into())).unwrap(),
            "no braces"
        );
        assert_eq!(
            substitute("#cloud-config\n\na: {{hostname}}\n", |_| Ok(String::new())),
            Err(SubstitutionError::Unknown {
                line: 3,
                text: "hostname".into()
            })
        );
        assert_eq!(
            substitute("a: {{addresses.}}", |_| Ok(String::new())),
            Err(SubstitutionError::Unknown {
                line: 1,
                text: "addresses.".into()
            })
        );
        assert_eq!(
            substitute("a\nb: {{name\n}}", |_| Ok(String::new())),
            Err(SubstitutionError::Unclosed { line: 2 })
        );
        assert_eq!(
            substitute("a\nb\nc: {{addresses.db}}", |_| Err(
                "db has no address".into()
            ))
            .unwrap_err()
            .to_string(),
            "user-data line 3: db has no address"
        );
    }
}
