//! An opt-in Prometheus text endpoint (`GET /metrics`, `--metrics-listen ADDR`): the newest
//! value of every host's and workload's series, each host's link, and each service's status
//! and instances, so that Grafana charts the same numbers as the console.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::api::{
    ApiError, EngineClient, ops,
    views::{FleetVm, HostSummary, SeriesValue, ServiceSummary},
};

/// A request head larger than this is refused.
const MAX_HEAD_BYTES: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for /metrics on {address}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The endpoint while it serves; dropping it stops the listener (and lets the engine stop).
#[derive(Debug)]
pub struct MetricsServer {
    pub address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts serving on `address` (a port of 0 picks one).
pub async fn serve(
    engine: EngineClient,
    address: SocketAddr,
) -> Result<MetricsServer, MetricsError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Listen { address, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError::Listen { address, source })?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let engine = engine.clone();
            tokio::spawn(async move {
                let _ = answer(engine, stream).await;
            });
        }
    });
    Ok(MetricsServer {
        address: bound,
        task,
    })
}

async fn answer(engine: EngineClient, mut stream: TcpStream) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // The request line and headers, up to the blank line.
    let complete = tokio::time::timeout(READ_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() <= MAX_HEAD_BYTES {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(head.len() <= MAX_HEAD_BYTES)
    })
    .await
    .unwrap_or(Ok(false))?;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (parts.next(), parts.next());
    let (status, body) = if !complete {
        ("400 Bad Request", "bad request\n".to_string())
    } else if method != Some("GET") {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path.map(|p| p.split('?').next()) != Some(Some("/metrics")) {
        ("404 Not Found", "see /metrics\n".to_string())
    } else {
        match scrape(&engine).await {
            Ok(body) => ("200 OK", body),
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// What the engine says now, as exposition text.
async fn scrape(engine: &EngineClient) -> Result<String, ApiError> {
    let hosts = engine.hosts(ops::ListHosts {}).await?;
    let vms = engine.vms(ops::ListVms {}).await?;
    let services = engine.services(ops::ListServices {}).await?;
    let latest = engine.latest_values(ops::LatestValues {}).await?;
    Ok(render(&hosts, &vms, &services, &latest))
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text: one family per metric, then one line per subject.
pub fn render(
    hosts: &[HostSummary],
    vms: &[FleetVm],
    services: &[ServiceSummary],
    latest: &[SeriesValue],
) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, lines: Vec<String>| {
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for line in lines {
            let _ = writeln!(out, "{name}{line}");
        }
    };
    family(
        "dunes_host_up",
        "1 when the console's link to the host's agent is up.",
        hosts
            .iter()
            .map(|h| {
                format!(
                    "{{host=\"{}\",site=\"{}\"}} {}",
                    label(h.id.as_str()),
                    label(&h.site),
                    u8::from(h.state == "online")
                )
            })
            .collect(),
    );
    // Where each workload runs now, for its labels.
    let host_of = |vm: &str| {
        vms.iter()
            .find(|v| v.vm.name.as_str() == vm)
            .map(|v| v.vm.host.to_string())
    };
    let metrics = [
        (
            "cpu",
            "cpu_percent",
            "CPU use, percent of the subject's CPUs.",
        ),
        ("memory", "memory_used_mib", "Memory in use, MiB."),
        (
            "disk-read",
            "disk_read_bytes_per_second",
            "Bytes read from disk per second.",
        ),
        (
            "disk-write",
            "disk_write_bytes_per_second",
            "Bytes written to disk per second.",
        ),
        (
            "net-rx",
            "network_receive_bytes_per_second",
            "Bytes received per second.",
        ),
        (
            "net-tx",
            "network_transmit_bytes_per_second",
            "Bytes sent per second.",
        ),
    ];
    for (kind, what) in [("host", "host"), ("vm", "workload")] {
        for (metric, name, help) in metrics {
            let lines = latest
                .iter()
                .filter_map(|SeriesValue { series: key, value }| {
                    let mut parts = key.splitn(3, '/');
                    let (k, subject, m) = (parts.next()?, parts.next()?, parts.next()?);
                    if k != kind || m != metric || !value.is_finite() {
                        return None;
                    }
                    Some(if kind == "host" {
                        format!("{{host=\"{}\"}} {value}", label(subject))
                    } else {
                        let host = host_of(subject).unwrap_or_default();
                        format!(
                            "{{workload=\"{}\",host=\"{}\"}} {value}",
                            label(subject),
                            label(&host)
                        )
                    })
                })
                .collect();
            family(&format!("dunes_{what}_{name}"), help, lines);
        }
    }
    family(
        "dunes_service_status",
        "1 for the service's status now.",
        services
            .iter()
            .map(|s| {
                format!(
                    "{{service=\"{}\",status=\"{}\"}} 1",
                    label(s.name.as_str()),
                    s.status
                )
            })
            .collect(),
    );
    let mut instances = Vec::new();
    let mut ready = Vec::new();
    for s in services {
        let mut apps: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for i in &s.instances {
            let counts = apps.entry(i.application.as_str()).or_default();
            counts.0 += 1;
            counts.1 += usize::from(i.ready);
            // An application inside a VM has an instance in each VM holding it; up is ready.
            for g in &i.guest_apps {
                let counts = apps.entry(g.name.as_str()).or_default();
                counts.0 += 1;
                counts.1 += usize::from(g.state == "up");
            }
        }
        for (app, (all, up)) in apps {
            let labels = format!(
                "{{service=\"{}\",application=\"{}\"}}",
                label(s.name.as_str()),
                label(app)
            );
            instances.push(format!("{labels} {all}"));
            ready.push(format!("{labels} {up}"));
        }
    }
    family(
        "dunes_application_instances",
        "Instances of the application.",
        instances,
    );
    family(
        "dunes_application_instances_ready",
        "Instances of the application that are ready.",
        ready,
    );
    out
}
