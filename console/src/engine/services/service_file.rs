//! Service files (TOML), as an operator writes them. Every refusal names the line: a field the
//! format does not have, a value of the wrong kind, or a definition that does not hold (a
//! dependency cycle, a rule naming an unknown application).
//!
//! ```toml
//! name = "shop"
//!
//! [[application]]
//! name = "db"
//! runtime = "libvirt"
//! template = "tiny"
//! vcpus = 2
//! memory_mib = 2048
//! storage_mib = 20480
//! instances = 1
//! readiness = "guest-agent"          # running | guest-agent | { tcp = 5432 } | { command = "..." }
//! # or, instead of template, a library image with cloud-init user-data filled in per
//! # instance ({{name}}, {{index}}, {{service}}, {{application}}, {{addresses.APP}}):
//! # image = "debian-12"
//! # disk_gib = 8
//! # user_data = """#cloud-config
//! # write_files: [{ path: /etc/shop-db, content: "{{addresses.db}}" }]"""
//! metric = { tcp = 5432 }             # or { command = "..." } printing a number (autoscaling)
//!
//! [[application.guest_app]]              # runs inside each of db's VMs (guest agent)
//! name = "backup"
//! process = "backupd"                 # alive while a process of this name runs
//! check = "test -s /var/run/backupd.ok"   # healthy while this exits 0
//!
//! [[application]]
//! name = "web"
//! depends_on = ["db"]
//! # ...
//!
//! [rules]
//! distinct_hosts = ["web"]
//! anti_affinity = [["web", "reports"]]
//! affinity = [["db", "reports"]]      # reports runs where db runs
//! pin = [{ application = "db", sites = ["lausanne"] }]
//! never_relocate = ["payment"]
//! min_security_level = [{ application = "payment", level = 3 }]
//! allowed_sites = ["lausanne", "geneva"]
//! max_cost_per_hour = 2.5
//!
//! [network]                           # the service's instances on a network of their own
//! subnet = "10.40.0.0/24"             # chosen by the console when not given
//! # name = "shared"                   # or a network several services join
//! connect = ["payments"]              # services its instances may open connections to
//! publish = [{ app = "web", port = 80, host_port = 8080, hosts = "site:lausanne" }]
//! ```

use dunes_shared::{
    model::{
        AppName, HostId, ImageName, NetworkName, RuntimeKind, ServiceName, SiteName, TemplateName,
    },
    network::{NetworkError, NetworkSpec, PublishHosts, PublishSpec},
    service::{
        AppMetric, ApplicationSpec, GuestAppSpec, InterpreterNeed, PinRule, Readiness,
        SecurityRule, ServiceError, ServiceRules, ServiceSpec,
    },
};
use serde::Deserialize;
use toml::Spanned;

/// Why a service file is refused: where, and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ServiceFileError {
    pub line: usize,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: Spanned<ServiceName>,
    #[serde(rename = "application", default)]
    applications: Vec<AppFile>,
    #[serde(default)]
    rules: Option<Spanned<RulesFile>>,
    #[serde(default)]
    network: Option<Spanned<NetworkFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkFile {
    #[serde(default)]
    name: Option<NetworkName>,
    #[serde(default)]
    subnet: Option<ipnet::Ipv4Net>,
    #[serde(default)]
    connect: Vec<ServiceName>,
    #[serde(default)]
    publish: Vec<PublishFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishFile {
    app: AppName,
    port: u16,
    host_port: u16,
    #[serde(default = "all_hosts")]
    hosts: PublishHosts,
}

fn all_hosts() -> PublishHosts {
    PublishHosts::All
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppFile {
    name: Spanned<AppName>,
    runtime: RuntimeFile,
    #[serde(default)]
    template: Option<TemplateName>,
    #[serde(default)]
    image: Option<ImageName>,
    #[serde(default)]
    disk_gib: Option<u64>,
    #[serde(default)]
    user_data: Option<String>,
    #[serde(default)]
    interpreter: Option<InterpreterFile>,
    vcpus: u32,
    memory_mib: u64,
    #[serde(default)]
    storage_mib: u64,
    #[serde(default)]
    bandwidth_mbps: u32,
    #[serde(default = "one")]
    instances: u32,
    #[serde(default)]
    readiness: Option<ReadinessFile>,
    #[serde(default)]
    depends_on: Vec<AppName>,
    #[serde(default)]
    guest_app: Vec<GuestAppFile>,
    #[serde(default)]
    metric: Option<MetricFile>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MetricFile {
    Command(MetricCommandFile),
    Tcp(MetricTcpFile),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricCommandFile {
    command: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricTcpFile {
    tcp: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestAppFile {
    name: Spanned<AppName>,
    #[serde(default)]
    process: Option<String>,
    #[serde(default)]
    check: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RuntimeFile {
    Libvirt,
    Process,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterpreterFile {
    name: String,
    #[serde(default)]
    min_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ReadinessFile {
    Word(ReadinessWord),
    Tcp { tcp: u16 },
    Command { command: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ReadinessWord {
    Running,
    GuestAgent,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    distinct_hosts: Vec<AppName>,
    #[serde(default)]
    anti_affinity: Vec<[AppName; 2]>,
    #[serde(default)]
    affinity: Vec<[AppName; 2]>,
    #[serde(default)]
    pin: Vec<PinFile>,
    #[serde(default)]
    never_relocate: Vec<AppName>,
    #[serde(default)]
    min_security_level: Vec<SecurityFile>,
    #[serde(default)]
    allowed_sites: Vec<SiteName>,
    #[serde(default)]
    max_cost_per_hour: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinFile {
    application: AppName,
    #[serde(default)]
    hosts: Vec<HostId>,
    #[serde(default)]
    sites: Vec<SiteName>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityFile {
    #[serde(default)]
    application: Option<AppName>,
    level: u8,
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The key written on a line (`vcpus = 0` → `vcpus`), to name the field of a bad value.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = l.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.contains(['[', '{', ' '])).then(|| key.to_string())
}

/// The key of the network table a refusal is about.
fn network_key(e: &NetworkError) -> &'static str {
    match e {
        NetworkError::HostBits { .. }
        | NetworkError::Prefix { .. }
        | NetworkError::Reserved { .. } => "subnet",
        NetworkError::ConnectSelf => "connect",
        NetworkError::UnknownApp(_) | NetworkError::ZeroPort | NetworkError::HostPortTwice(_) => {
            "publish"
        }
    }
}

/// The first line from `from` on that sets `key` (`key = ...`), or `from`.
fn key_line_after(text: &str, from: usize, key: &str) -> usize {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(from, |(i, _)| i + 1)
}

/// Parses and checks a service file; nothing is created from a file that fails.
pub fn parse_service_file(text: &str) -> Result<ServiceSpec, ServiceFileError> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        let message = e.message().trim().to_string();
        let message = if message.contains("untagged enum MetricFile") {
            "metric must be { command = \"...\" } or { tcp = PORT }".to_string()
        } else {
            message
        };
        let message = match key_on_line(text, line) {
            Some(key) if !message.contains(&format!("`{key}`")) => format!("{key}: {message}"),
            _ => message,
        };
        ServiceFileError { line, message }
    })?;
    let name_line = line_of(text, file.name.span().start);
    let app_lines: Vec<(AppName, usize)> = file
        .applications
        .iter()
        .flat_map(|a| std::iter::once(&a.name).chain(a.guest_app.iter().map(|g| &g.name)))
        .map(|n| (n.get_ref().clone(), line_of(text, n.span().start)))
        .collect();
    let rules_line = file
        .rules
        .as_ref()
        .map_or(name_line, |r| line_of(text, r.span().start));
    let network_line = file
        .network
        .as_ref()
        .map_or(name_line, |n| line_of(text, n.span().start));
    let applications = file
        .applications
        .into_iter()
        .map(|a| {
            let line = line_of(text, a.name.span().start);
            app_spec(a).map_err(|message| ServiceFileError { line, message })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let spec = ServiceSpec {
        name: file.name.into_inner(),
        applications,
        rules: file
            .rules
            .map(|r| rules_spec(r.into_inner()))
            .unwrap_or_default(),
        network: file.network.map(|n| {
            let n = n.into_inner();
            NetworkSpec {
                name: n.name,
                subnet: n.subnet,
                connect: n.connect,
                publish: n
                    .publish
                    .into_iter()
                    .map(|p| PublishSpec {
                        app: p.app,
                        port: p.port,
                        host_port: p.host_port,
                        hosts: p.hosts,
                    })
                    .collect(),
            }
        }),
    };
    spec.validate().map_err(|e| {
        let app_line = |a: &AppName| app_lines.iter().find(|(n, _)| n == a).map(|(_, l)| *l);
        let line = match &e {
            ServiceError::Empty(_) => Some(name_line),
            ServiceError::DuplicateApp(a) => app_lines
                .iter()
                .filter(|(n, _)| n == a)
                .nth(1)
                .map(|(_, l)| *l),
            ServiceError::BadApp { app, .. } => app_line(app),
            ServiceError::Cycle(cycle) => cycle.first().and_then(app_line),
            ServiceError::UnknownApp { rule, .. } if rule.starts_with("application ") => spec
                .applications
                .iter()
                .find(|a| rule.starts_with(&format!("application {}'s", a.name)))
                .and_then(|a| app_line(&a.name)),
            ServiceError::UnknownApp { .. } | ServiceError::Contradiction(_) => Some(rules_line),
            ServiceError::Network(e) => Some(key_line_after(text, network_line, network_key(e))),
        };
        ServiceFileError {
            line: line.unwrap_or(1),
            message: e.to_string(),
        }
    })?;
    Ok(spec)
}

fn app_spec(a: AppFile) -> Result<ApplicationSpec, String> {
    let template = match (a.template, &a.image) {
        (Some(template), None) => template,
        (None, Some(image)) => {
            TemplateName::new(image.as_str()).map_err(|e| format!("image {image}: {e}"))?
        }
        (Some(_), Some(_)) => {
            return Err(format!(
                "application {}: give template or image, not both",
                a.name.get_ref()
            ));
        }
        (None, None) => {
            return Err(format!(
                "application {}: give a template, or an image from the library (image = \"NAME\")",
                a.name.get_ref()
            ));
        }
    };
    Ok(ApplicationSpec {
        name: a.name.into_inner(),
        runtime: match a.runtime {
            RuntimeFile::Libvirt => RuntimeKind::Libvirt,
            RuntimeFile::Process => RuntimeKind::Process,
        },
        template,
        image: a.image,
        disk_gib: a.disk_gib,
        user_data: a.user_data,
        interpreter: a.interpreter.map(|i| InterpreterNeed {
            name: i.name,
            min_version: i.min_version,
        }),
        vcpus: a.vcpus,
        memory_mib: a.memory_mib,
        storage_mib: a.storage_mib,
        bandwidth_mbps: a.bandwidth_mbps,
        instances: a.instances,
        readiness: match a.readiness {
            None | Some(ReadinessFile::Word(ReadinessWord::Running)) => Readiness::Running,
            Some(ReadinessFile::Word(ReadinessWord::GuestAgent)) => Readiness::GuestAgent,
            Some(ReadinessFile::Tcp { tcp }) => Readiness::Tcp { port: tcp },
            Some(ReadinessFile::Command { command }) => Readiness::Command { command },
        },
        depends_on: a.depends_on,
        guest_apps: a
            .guest_app
            .into_iter()
            .map(|g| GuestAppSpec {
                name: g.name.into_inner(),
                process: g.process,
                check: g.check,
            })
            .collect(),
        metric: a.metric.map(|m| match m {
            MetricFile::Command(c) => AppMetric::Command { command: c.command },
            MetricFile::Tcp(t) => AppMetric::Tcp { port: t.tcp },
        }),
    })
}

fn rules_spec(r: RulesFile) -> ServiceRules {
    ServiceRules {
        distinct_hosts: r.distinct_hosts,
        anti_affinity: r.anti_affinity,
        affinity: r.affinity,
        pin: r
            .pin
            .into_iter()
            .map(|p| PinRule {
                application: p.application,
                hosts: p.hosts,
                sites: p.sites,
            })
            .collect(),
        never_relocate: r.never_relocate,
        min_security_level: r
            .min_security_level
            .into_iter()
            .map(|s| SecurityRule {
                application: s.application,
                level: s.level,
            })
            .collect(),
        allowed_sites: r.allowed_sites,
        max_cost_per_hour: r.max_cost_per_hour,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = include_str!("../../../../assets/examples/shop.toml");

    #[test]
    fn a_network_is_read_and_a_bad_one_is_named_by_its_line() {
        let text = r#"name = "shop"

[[application]]
name = "web"
runtime = "libvirt"
template = "tiny"
vcpus = 1
memory_mib = 128
instances = 2

[network]
subnet = "10.40.0.0/24"
connect = ["payments"]
publish = [{ app = "web", port = 80, host_port = 8080, hosts = "site:lausanne" }]
"#;
        let spec = parse_service_file(text).unwrap();
        let network = spec.network.as_ref().unwrap();
        assert_eq!(network.subnet.unwrap().to_string(), "10.40.0.0/24");
        assert_eq!(network.connect[0].as_str(), "payments");
        assert_eq!(network.publish[0].host_port, 8080);
        assert_eq!(network.publish[0].hosts.to_string(), "site:lausanne");
        // Without hosts, every host of the network publishes.
        let everywhere = text.replace(", hosts = \"site:lausanne\"", "");
        let spec = parse_service_file(&everywhere).unwrap();
        assert_eq!(spec.network.unwrap().publish[0].hosts, PublishHosts::All);
        for (bad, line, says) in [
            (
                text.replace("10.40.0.0/24", "10.40.0.9/24"),
                12,
                "did you mean 10.40.0.0/24",
            ),
            (text.replace("10.40.0.0/24", "10.40.0/24"), 12, "subnet"),
            (text.replace("app = \"web\"", "app = \"db\""), 14, "db"),
            (text.replace("\"payments\"", "\"shop\""), 13, "itself"),
            (text.replace("site:lausanne", "rack:4"), 14, "site:NAME"),
            (text.replace("connect", "conect"), 13, "conect"),
        ] {
            let err = parse_service_file(&bad).unwrap_err();
            assert_eq!(err.line, line, "{err}");
            assert!(err.message.contains(says), "{err}");
        }
        // Names are DNS labels: an application's longer than one is refused, with its line.
        let long = text.replace("name = \"web\"", &format!("name = \"{}\"", "w".repeat(64)));
        let err = parse_service_file(&long).unwrap_err();
        assert_eq!(err.line, 4, "{err}");
        assert!(err.message.contains("1 to 63 characters"), "{err}");
    }

    #[test]
    fn guest_applications_are_read_and_a_bad_one_is_named_by_its_line() {
        let text = r#"name = "box"

[[application]]
name = "vm"
runtime = "libvirt"
template = "tiny"
vcpus = 1
memory_mib = 128

[[application.guest_app]]
name = "web"
process = "httpd"
check = "wget -q -O /dev/null http://127.0.0.1:8080/"

[[application.guest_app]]
name = "worker"
process = "worker"
"#;
        let spec = parse_service_file(text).unwrap();
        let vm = spec.application(&AppName::new("vm").unwrap()).unwrap();
        assert_eq!(vm.guest_apps.len(), 2);
        assert_eq!(vm.guest_apps[1].process.as_deref(), Some("worker"));
        assert!(
            vm.guest_apps[0]
                .check
                .as_deref()
                .unwrap()
                .starts_with("wget")
        );
        let bad = text.replace("process = \"worker\"", "process = \"\"");
        let err = parse_service_file(&bad).unwrap_err();
        assert_eq!(err.line, 16, "{err}");
        assert!(
            err.message
                .starts_with("application worker: process must be"),
            "{err}"
        );
        let unknown = text.replace("process = \"worker\"", "command = \"x\"");
        let err = parse_service_file(&unknown).unwrap_err();
        assert_eq!(err.line, 17, "{err}");
    }

    #[test]
    fn an_application_metric_is_a_command_or_a_port() {
        let base = "name = \"s\"\n[[application]]\nname = \"web\"\nruntime = \"process\"\ntemplate = \"t\"\nvcpus = 1\nmemory_mib = 64\n";
        let with = |metric: &str| parse_service_file(&format!("{base}metric = {metric}\n"));
        let metric = |m: &str| with(m).unwrap().applications[0].metric.clone();
        assert_eq!(
            metric("{ command = \"cat /run/queue\" }"),
            Some(AppMetric::Command {
                command: "cat /run/queue".into()
            })
        );
        assert_eq!(
            metric("{ tcp = 8080 }"),
            Some(AppMetric::Tcp { port: 8080 })
        );
        let err = with("{ udp = 53 }").unwrap_err();
        assert_eq!(err.line, 8, "{err}");
        assert!(err.message.contains("metric must be { command"), "{err}");
        let err = with("{ tcp = 0 }").unwrap_err();
        assert_eq!(
            err.message,
            "application web: the metric port must not be 0"
        );
    }

    #[test]
    fn an_application_from_an_image_carries_user_data_checked_with_its_placeholders() {
        let text = r##"name = "shop"

[[application]]
name = "db"
runtime = "libvirt"
image = "debian-12"
vcpus = 1
memory_mib = 512

[[application]]
name = "web"
runtime = "libvirt"
image = "debian-12"
disk_gib = 8
vcpus = 1
memory_mib = 512
depends_on = ["db"]
user_data = """#cloud-config
write_files:
  - path: /etc/shop
    content: "{{ addresses.db }} for {{name}}"
"""
"##;
        let spec = parse_service_file(text).unwrap();
        let web = spec.application(&AppName::new("web").unwrap()).unwrap();
        assert_eq!(web.image.as_ref().map(|i| i.as_str()), Some("debian-12"));
        assert_eq!(web.template.as_str(), "debian-12");
        assert_eq!(web.disk_gib, Some(8));
        let filled = web
            .fill_user_data(
                web.user_data.as_deref().unwrap(),
                "shop-web-1",
                1,
                "shop",
                |app| {
                    assert_eq!(app.as_str(), "db");
                    Ok(vec!["10.0.2.15".into()])
                },
            )
            .unwrap();
        assert!(
            filled.contains("content: \"10.0.2.15 for shop-web-1\""),
            "{filled}"
        );

        let err = |text: &str| parse_service_file(text).unwrap_err();
        let e = err(&text.replace("addresses.db", "addresses.web"));
        assert_eq!(e.line, 11, "{e}");
        assert!(
            e.message
                .contains("names web, which web does not depend on"),
            "{e}"
        );
        let e = err(&text.replace("{{name}}", "{{hostname}}"));
        assert!(
            e.message
                .contains("user-data line 4: {{hostname}} is not a value"),
            "{e}"
        );
        let e = err(&text.replace("    content:", "  content: ["));
        assert!(
            e.message.starts_with("application web: user-data line"),
            "{e}"
        );
        let e = err(&text.replace("disk_gib = 8", "template = \"tiny\""));
        assert_eq!(
            e.message,
            "application web: give template or image, not both"
        );
        let e = err(&text.replace("image = \"debian-12\"\nvcpus", "vcpus"));
        assert!(e.message.contains("give a template, or an image"), "{e}");
        let process = text
            .replace("image = \"debian-12\"\ndisk_gib = 8", "template = \"web\"")
            .replace(
                "name = \"web\"\nruntime = \"libvirt\"",
                "name = \"web\"\nruntime = \"process\"",
            );
        let e = err(&process);
        assert!(
            e.message
                .contains("disk_gib and user_data are for VMs made from an image"),
            "{e}"
        );
    }

    #[test]
    fn the_example_shop_parses() {
        let spec = parse_service_file(SHOP).unwrap();
        assert_eq!(spec.name.as_str(), "shop");
        let order: Vec<&str> = spec
            .start_order()
            .unwrap()
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        let at = |n: &str| order.iter().position(|a| *a == n).unwrap();
        assert!(
            at("db") < at("payment") && at("payment") < at("web"),
            "{order:?}"
        );
        let web = spec.application(&AppName::new("web").unwrap()).unwrap();
        assert_eq!(web.instances, 2);
        assert!(spec.rules.distinct_hosts.contains(&web.name));
    }

    #[test]
    fn an_unknown_field_names_its_line() {
        let text = "name = \"s\"\n\n[[application]]\nname = \"a\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 256\ncolour = \"red\"\n";
        let err = parse_service_file(text).unwrap_err();
        assert_eq!(err.line, 9, "{err}");
        assert!(err.message.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_line_and_field() {
        let text = "name = \"s\"\n[[application]]\nname = \"a\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = \"two\"\nmemory_mib = 256\n";
        let err = parse_service_file(text).unwrap_err();
        assert_eq!(err.line, 6, "{err}");
        assert!(err.message.starts_with("vcpus: "), "{err}");
        let text = "name = \"Shop!\"\n";
        let err = parse_service_file(text).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.message.contains("invalid service name"), "{err}");
        let text = "name = \"s\"\n[[application]]\nname = \"a\"\nruntime = \"docker\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 256\n";
        let err = parse_service_file(text).unwrap_err();
        assert_eq!(err.line, 4, "{err}");
    }

    #[test]
    fn a_cycle_and_an_unknown_application_name_their_lines() {
        let app = |name: &str, deps: &str| {
            format!(
                "[[application]]\nname = \"{name}\"\nruntime = \"libvirt\"\ntemplate = \"tiny\"\nvcpus = 1\nmemory_mib = 256\ndepends_on = [{deps}]\n"
            )
        };
        let text = format!(
            "name = \"s\"\n{}{}",
            app("web", "\"db\""),
            app("db", "\"web\"")
        );
        let err = parse_service_file(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 10: the dependencies form a cycle: db → web → db"
        );
        let text = format!(
            "name = \"s\"\n{}\n[rules]\ndistinct_hosts = [\"cache\"]\n",
            app("web", "")
        );
        let err = parse_service_file(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 10: distinct_hosts names application cache, which the service does not have"
        );
    }
}
