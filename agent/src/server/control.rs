//! Control connections: a CA-verified console certificate, then the hello, then one request
//! per stream, dispatched to the runtimes.

use std::sync::Arc;

use dunes_shared::{
    codec::{MAX_FRAME_BYTES, PREAUTH_FRAME_BYTES},
    error_chain,
    model::VmStatus,
    pki,
    protocol::{
        CancelTransfer, CheckReady, CloneVm, ConfigureVm, CreateVm, DeleteVm, DiscardDisk,
        ErrorCode, ExportVm, GuestApps, GuestExec, HashDisk, Hello, HelloReply, ImportVm,
        ListTemplates, ListVms, MetricReply, PowerVm, PrepareReceive, ReadMetric, RenewBegin,
        RenewBeginReply, RenewFinish, Request, SendDisk, SetNetworks, SiteAddresses, SnapshotVm,
        StartVm, StopVm, WireError, codes, features,
    },
    rpc::{Incoming, encode_reply, read_request, send_reply, unsupported_reply},
};
use rustls::pki_types::CertificateDer;

use super::{
    HELLO_TIMEOUT, Shared, enrollment::install_certificate, lock, off_worker, status::push_events,
};
use crate::runtime::RuntimeError;

/// Every workload of every runtime of the host, by name.
pub(super) async fn list_vms(shared: &Shared) -> Result<Vec<VmStatus>, RuntimeError> {
    let mut all = Vec::new();
    for runtime in shared.runtimes.all() {
        all.extend(runtime.list().await?);
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(all)
}

pub(super) async fn serve_control(shared: Arc<Shared>, conn: quinn::Connection) {
    let peer = conn
        .peer_identity()
        .and_then(|a| a.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().cloned());
    // Subscribed before the check: an enrollment that lands after it is seen as a change.
    let mut enrollments = shared.enrollments.subscribe();
    // The handshake verified the chain (when a certificate was sent at all) under the CA of
    // that moment; the role is ours to check, and the CA may have changed since.
    let Some(peer) = peer.filter(|c| console_trusted(&shared, c)) else {
        tracing::warn!(remote = %conn.remote_address(), "control connection without a console certificate from the cluster CA refused");
        conn.close(
            codes::CLOSE_UNAUTHENTICATED,
            b"a console certificate from this cluster's CA is required",
        );
        return;
    };
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let request = read_request(&mut send, &mut recv, PREAUTH_FRAME_BYTES)
            .await
            .ok()?;
        Some((send, request))
    })
    .await;
    let Ok(Some((
        mut send,
        Incoming::Request(Request::Hello(Hello {
            console_name,
            features: console_features,
        })),
    ))) = hello
    else {
        conn.close(codes::CLOSE_BAD_HELLO, b"expected a hello");
        return;
    };
    // Subscribe before listing, so no change falls between the list and the stream.
    let events = shared.events.subscribe();
    let vms = match list_vms(&shared).await {
        Ok(v) => v,
        Err(e) => {
            let frame = encode_reply::<Hello>(Err(e.to_wire()));
            if let Ok(frame) = frame {
                let _ = send_reply(&mut send, &frame).await;
            }
            return;
        }
    };
    let Some((inventory, status)) = off_worker(&shared, |s| (s.inventory(), s.status())).await
    else {
        return;
    };
    let reply = HelloReply {
        inventory,
        status,
        vms,
        features: features::announce(features::AGENT),
    };
    match encode_reply::<Hello>(Ok(reply)) {
        Ok(frame) if send_reply(&mut send, &frame).await.is_ok() => {}
        _ => return,
    }
    tracing::info!(remote = %conn.remote_address(), console = %console_name, features = ?console_features, "console connected");
    let samples = console_features.iter().any(|f| f == features::SAMPLES);
    tokio::spawn(push_events(shared.clone(), conn.clone(), events, samples));
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            _ = enrollments.changed() => {
                if console_trusted(&shared, &peer) {
                    continue;
                }
                // Enrolled into another cluster: this console's trust is gone.
                tracing::info!(remote = %conn.remote_address(), "closing a console connection the new enrollment no longer trusts");
                conn.close(codes::CLOSE_UNAUTHENTICATED, b"the agent was enrolled again");
                return;
            }
        };
        let (mut send, mut recv) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(remote = %conn.remote_address(), "console connection ended: {e}");
                return;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let request = match read_request(&mut send, &mut recv, MAX_FRAME_BYTES).await {
                Ok(Incoming::Request(r)) => r,
                Ok(Incoming::Unknown(kind)) => {
                    tracing::warn!(request = %kind, "a request this agent does not know was refused");
                    if let Ok(frame) = unsupported_reply(&kind) {
                        let _ = send_reply(&mut send, &frame).await;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("bad request frame: {}", error_chain(&e));
                    return;
                }
            };
            // Bulk data has the stream to itself.
            match request {
                Request::ReceiveImage(push) => {
                    return super::images::receive_image(shared, push, send, recv).await;
                }
                Request::OpenConsole(open) => {
                    return super::console::serve_console(shared, open, send, recv).await;
                }
                Request::OpenScreen(open) => {
                    return super::screen::serve_screen(shared, open, send, recv).await;
                }
                _ => {}
            }
            let kind = request.kind();
            match dispatch(&shared, request).await {
                Ok(frame) => {
                    let _ = send_reply(&mut send, &frame).await;
                }
                Err(e) => {
                    tracing::error!(request = kind, "reply does not encode: {}", error_chain(&e))
                }
            }
        });
    }
}

/// Whether `cert` is a console certificate of the CA the agent is enrolled under now.
fn console_trusted(shared: &Shared, cert: &CertificateDer<'static>) -> bool {
    let ca = lock(&shared.identity).ca_der.clone();
    ca.is_some_and(|ca| pki::verify_console_cert(cert, &ca).is_ok())
}

async fn dispatch(
    shared: &Arc<Shared>,
    request: Request,
) -> Result<Vec<u8>, dunes_shared::codec::FrameError> {
    let runtime = |kind| {
        shared
            .runtimes
            .get(kind)
            .ok_or(RuntimeError::NoRuntime(kind.as_str()))
    };
    match request {
        Request::ListVms(_) => {
            encode_reply::<ListVms>(list_vms(shared).await.map_err(|e| e.to_wire()))
        }
        Request::ListTemplates(_) => encode_reply::<ListTemplates>(
            match off_worker(shared, |s| s.storage.templates()).await {
                Some(listed) => {
                    listed.map_err(|e| WireError::new(ErrorCode::Storage, error_chain(&e)))
                }
                None => Err(shutting_down()),
            },
        ),
        Request::CreateVm(CreateVm {
            spec,
            start,
            runtime: kind,
            image_disk,
            cloud_init,
            network,
        }) => encode_reply::<CreateVm>(
            create_workload(runtime(kind), spec, start, image_disk, cloud_init, network).await,
        ),
        Request::SetNetworks(wanted) => encode_reply::<SetNetworks>(
            shared
                .networks
                .apply(&wanted)
                .await
                .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string())),
        ),
        Request::PowerVm(PowerVm {
            name,
            action,
            runtime: kind,
        }) => encode_reply::<PowerVm>(match runtime(kind) {
            Ok(rt) => rt.power(name, action).await.map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::ConfigureVm(request) => encode_reply::<ConfigureVm>(match shared.runtimes.vms() {
            Ok(rt) => rt.configure(request).await.map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::SnapshotVm(request) => encode_reply::<SnapshotVm>(match shared.runtimes.vms() {
            Ok(rt) => rt.snapshots(request).await.map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::CloneVm(request) => encode_reply::<CloneVm>(match shared.runtimes.vms() {
            Ok(rt) => rt.clone_vm(request).await.map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::StartVm(StartVm {
            name,
            runtime: kind,
            user_data,
        }) => encode_reply::<StartVm>(match runtime(kind) {
            Ok(rt) => match user_data {
                None => rt.start(name).await,
                Some(user_data) => rt.start_with_user_data(name, user_data).await,
            }
            .map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::StopVm(StopVm {
            name,
            force,
            timeout_secs,
            runtime: kind,
        }) => {
            let timeout = if timeout_secs == 0 {
                shared.config.stop_timeout_secs
            } else {
                timeout_secs
            };
            encode_reply::<StopVm>(match runtime(kind) {
                Ok(rt) => rt.stop(name, force, timeout).await.map_err(|e| e.to_wire()),
                Err(e) => Err(e.to_wire()),
            })
        }
        Request::CheckReady(CheckReady {
            name,
            probe,
            runtime: kind,
        }) => encode_reply::<CheckReady>(match runtime(kind) {
            Ok(rt) => rt.check_ready(name, probe).await.map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::GuestApps(request) => {
            encode_reply::<GuestApps>(match runtime(dunes_shared::model::RuntimeKind::Libvirt) {
                Ok(rt) => rt.guest_apps(request).await.map_err(|e| e.to_wire()),
                Err(e) => Err(e.to_wire()),
            })
        }
        Request::ReadMetric(ReadMetric {
            name,
            probe,
            runtime: kind,
        }) => encode_reply::<ReadMetric>(match runtime(kind) {
            Ok(rt) => rt
                .read_metric(name, probe)
                .await
                .map(|value| MetricReply {
                    value,
                    at_unix_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                })
                .map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::SiteAddresses(SiteAddresses { addresses }) => {
            encode_reply::<SiteAddresses>(site_addresses(shared, &addresses))
        }
        Request::GuestExec(request) => {
            encode_reply::<GuestExec>(match runtime(dunes_shared::model::RuntimeKind::Libvirt) {
                Ok(rt) => rt.guest_exec(request).await.map_err(|e| e.to_wire()),
                Err(e) => Err(e.to_wire()),
            })
        }
        Request::PrepareReceive(request) => {
            encode_reply::<PrepareReceive>(super::transfer::prepare_receive(shared, request))
        }
        Request::SendDisk(request) => {
            encode_reply::<SendDisk>(super::transfer::send(shared, request).await)
        }
        Request::ExportVm(ExportVm { name, flat }) => {
            encode_reply::<ExportVm>(match shared.storage.definition(&name) {
                Ok(Some(record)) if flat => {
                    use crate::runtime::libvirt::definition::VmDefinition;
                    VmDefinition::from_toml(&record)
                        .and_then(|d| d.flattened().to_toml())
                        .map_err(|e| WireError::new(ErrorCode::Storage, error_chain(&e)))
                }
                Ok(Some(record)) => Ok(record),
                Ok(None) => Err(WireError::new(
                    ErrorCode::NotFound,
                    format!("VM {name} has no portable definition on this host"),
                )),
                Err(e) => Err(WireError::new(ErrorCode::Storage, error_chain(&e))),
            })
        }
        Request::ImportVm(ImportVm { record }) => {
            encode_reply::<ImportVm>(match runtime(dunes_shared::model::RuntimeKind::Libvirt) {
                Ok(rt) => rt.import(record).await.map_err(|e| e.to_wire()),
                Err(e) => Err(e.to_wire()),
            })
        }
        Request::HashDisk(HashDisk { name, flat }) => {
            encode_reply::<HashDisk>(super::transfer::hash_disk(shared, name, flat).await)
        }
        Request::DiscardDisk(DiscardDisk { name }) => {
            encode_reply::<DiscardDisk>(super::transfer::discard(shared, name).await)
        }
        Request::CancelTransfer(CancelTransfer { ticket }) => {
            encode_reply::<CancelTransfer>(super::transfer::cancel_send(shared, &ticket))
        }
        Request::DeleteVm(DeleteVm {
            name,
            runtime: kind,
        }) => encode_reply::<DeleteVm>(match runtime(kind) {
            Ok(rt) => rt.delete(name).await.map_err(|e| e.to_wire()),
            Err(e) => Err(e.to_wire()),
        }),
        Request::RenewBegin(_) => encode_reply::<RenewBegin>(
            off_worker(shared, renew_begin)
                .await
                .unwrap_or_else(|| Err(shutting_down())),
        ),
        Request::RenewFinish(RenewFinish { cert_der }) => encode_reply::<RenewFinish>(
            off_worker(shared, move |s| renew_finish(s, cert_der))
                .await
                .unwrap_or_else(|| Err(shutting_down())),
        ),
        Request::Hello(_) => encode_reply::<Hello>(Err(WireError::new(
            ErrorCode::BadRequest,
            "hello was already exchanged on this connection",
        ))),
        other => encode_reply::<ListVms>(Err(WireError::new(
            ErrorCode::WrongProtocol,
            format!("{} is not part of the control protocol", other.kind()),
        ))),
    }
}

/// The site's hosts, for telling the traffic that leaves the site; a list with an
/// address that does not parse changes nothing.
/// Creates a workload; on a service network, stopped first, put on it, then started if
/// asked.
async fn create_workload(
    runtime: Result<&Arc<dyn crate::runtime::Runtime>, RuntimeError>,
    spec: dunes_shared::model::VmSpec,
    start: bool,
    image_disk: Option<dunes_shared::model::ImageDisk>,
    cloud_init: Option<dunes_shared::cloud_init::CloudInitData>,
    network: Option<dunes_shared::network::InstanceNic>,
) -> Result<dunes_shared::model::VmStatus, WireError> {
    let rt = runtime.map_err(|e| e.to_wire())?;
    if let Some(nic) = &network
        && (!crate::network::is_mac(&nic.mac)
            || !(576..=9000).contains(&nic.mtu)
            || !(1..=30).contains(&nic.prefix_len))
    {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!(
                "the network of {} is not one this agent can set up",
                spec.name
            ),
        ));
    }
    let name = spec.name.clone();
    let start_now = start && network.is_none();
    let created = match (image_disk, cloud_init) {
        (None, Some(_)) => {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                "cloud-init data is for VMs from library images",
            ));
        }
        (None, None) => rt.create(spec, start_now).await,
        (Some(disk), cloud_init) => {
            rt.create_from_image(spec, start_now, disk, cloud_init)
                .await
        }
    }
    .map_err(|e| e.to_wire())?;
    let Some(nic) = network else {
        return Ok(created);
    };
    let joined = match rt.join_network(name.clone(), nic).await {
        Ok(status) => status,
        Err(e) => {
            // Nothing half-made stays: the workload goes, and the console may ask again.
            let _ = rt.delete(name).await;
            return Err(e.to_wire());
        }
    };
    if start {
        return rt.start(name).await.map_err(|e| e.to_wire());
    }
    Ok(joined)
}

fn site_addresses(shared: &Shared, addresses: &[String]) -> Result<(), WireError> {
    const MAX_ADDRESSES: usize = 10_000;
    if addresses.len() > MAX_ADDRESSES {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("at most {MAX_ADDRESSES} site addresses are taken"),
        ));
    }
    let parsed = addresses
        .iter()
        .map(|a| {
            a.parse::<std::net::IpAddr>().map_err(|_| {
                WireError::new(ErrorCode::BadRequest, format!("{a:?} is not an IP address"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    lock(&shared.traffic).set_site_hosts(parsed);
    Ok(())
}

pub(super) fn shutting_down() -> WireError {
    WireError::new(ErrorCode::Internal, "the agent is shutting down")
}

/// A CSR for the key this agent has: the pinned key stays through every renewal.
fn renew_begin(shared: &Shared) -> Result<RenewBeginReply, WireError> {
    let identity = lock(&shared.identity);
    if !identity.is_enrolled() {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "this agent is not enrolled",
        ));
    }
    let csr_der = pki::host_csr(&identity.key_pem, &identity.host_id)
        .map_err(|e| WireError::new(ErrorCode::Internal, error_chain(&e)))?;
    Ok(RenewBeginReply { csr_der })
}

/// Installs a renewed certificate from the CA this agent is enrolled under.
fn renew_finish(shared: &Shared, cert_der: Vec<u8>) -> Result<(), WireError> {
    let mut identity = lock(&shared.identity);
    let Some(ca) = identity.ca_der.clone() else {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            "this agent is not enrolled",
        ));
    };
    install_certificate(shared, &mut identity, CertificateDer::from(cert_der), &ca)?;
    let expires = pki::cert_validity(&identity.cert_der)
        .ok()
        .and_then(|v| v.expires.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    tracing::info!(expires_unix = expires, "certificate renewed");
    Ok(())
}
