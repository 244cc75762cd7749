//! `dunes-console ctl`: each command is one typed request through the engine client; its
//! response prints as a table, or with `--json` as its serde form.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use serde::Serialize;

use super::{args::*, render};
use crate::{
    api::{EngineClient, credential::Credential, ops, remote::RemoteEngine},
    engine,
};

pub(super) fn run_ctl(data_dir: Option<PathBuf>, args: CtlArgs) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir.map_or_else(|| super::default_data_dir(false), Ok)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Stopping a guest may take the agent's whole shutdown timeout; the engine gives up on
    // the agent first and says why.
    let timeout = engine::STOP_CALL_TIMEOUT + Duration::from_secs(30);
    let out = Output { json: args.json };
    runtime.block_on(async {
        let client = match &args.connect {
            Some(file) => {
                let mut credential = Credential::load(file)?;
                let session = RemoteEngine::connect(&credential).await?;
                // Renewed in passing, as an agent renews its own.
                match session.renew_if_due(&mut credential, file).await {
                    Ok(true) => eprintln!(
                        "dunes-console: renewed the certificate in {}",
                        file.display()
                    ),
                    Ok(false) => {}
                    Err(e) => eprintln!(
                        "dunes-console: the certificate in {} is due for renewal, which failed: {e}",
                        file.display()
                    ),
                }
                EngineClient::Remote {
                    session: std::sync::Arc::new(session),
                    timeout,
                }
            }
            None => EngineClient::local_socket(&data_dir, timeout),
        };
        run(&client, &args.command, out).await
    })
}

#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// Prints a response: its serde form with `--json`, else as `text` renders it.
    fn show<T: Serialize>(self, value: &T, text: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        if self.json {
            // Through a `Value`, so the keys print in the same order however the response
            // came (in this process or over the socket).
            let value = serde_json::to_value(value)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            print!("{}", text(value));
        }
        Ok(())
    }
}

fn read_service_file(file: &std::path::Path) -> anyhow::Result<String> {
    let size = std::fs::metadata(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
        .len();
    if size > crate::ctl::MAX_REQUEST_BYTES as u64 / 2 {
        anyhow::bail!(
            "{} is {size} bytes; a service file may have at most {}",
            file.display(),
            crate::ctl::MAX_REQUEST_BYTES / 2
        );
    }
    std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))
}

async fn run(client: &EngineClient, command: &CtlCommand, out: Output) -> anyhow::Result<ExitCode> {
    match command {
        CtlCommand::Hosts => out.show(&client.hosts(ops::ListHosts {}).await?, |h| {
            render::hosts(h)
        })?,
        CtlCommand::Vms => out.show(&client.vms(ops::ListVms {}).await?, |v| render::vms(v))?,
        CtlCommand::Events { limit } => out.show(
            &client.events(ops::ListEvents { limit: *limit }).await?,
            |e| render::events(e),
        )?,
        CtlCommand::Host(command) => run_host(client, command, out).await?,
        CtlCommand::Vm(command) => return run_vm(client, command, out).await,
        CtlCommand::Services => out.show(&client.services(ops::ListServices {}).await?, |s| {
            render::services(s)
        })?,
        CtlCommand::Service(command) => return run_service(client, command, out).await,
        CtlCommand::Migrations => out
            .show(&client.migrations(ops::ListMigrations {}).await?, |m| {
                render::migrations(m)
            })?,
        CtlCommand::Migration(MigrationCommand::Cancel { id }) => out.show(
            &client
                .cancel_migration(ops::CancelMigration { id: *id })
                .await?,
            render::migration,
        )?,
        CtlCommand::Forecast { site } => out.show(
            &client
                .forecast(ops::Forecast { site: site.clone() })
                .await?,
            |s| render::capacity_table(s),
        )?,
        CtlCommand::Whatif(command) => {
            let view = match command {
                WhatifCommand::Drain { host } => {
                    client
                        .what_if_drain(ops::WhatIfDrain { host: host.clone() })
                        .await?
                }
                WhatifCommand::Deploy { service } => {
                    client
                        .what_if_deploy(ops::WhatIfDeploy {
                            name: service.clone(),
                        })
                        .await?
                }
            };
            out.show(&view, render::what_if)?
        }
        CtlCommand::Cost { by, since } => out.show(
            &client
                .cost(ops::Cost {
                    by: by.clone(),
                    since_secs: *since,
                })
                .await?,
            |c| render::cost(by, c),
        )?,
        CtlCommand::Autoscale(command) => run_autoscale(client, command, out).await?,
        CtlCommand::Operator(command) => run_operator(client, command, out).await?,
        CtlCommand::Images => out.show(&client.images(ops::ListImages {}).await?, |i| {
            render::images(i)
        })?,
        CtlCommand::Image(command) => run_image(client, command, out).await?,
        CtlCommand::Networks => out.show(&client.networks(ops::ListNetworks {}).await?, |n| {
            render::networks(n)
        })?,
        CtlCommand::Audit(args) => return run_audit(client, args, out).await,
        CtlCommand::Stats {
            subject,
            since,
            resolution,
        } => out.show(
            &client
                .stats(ops::Stats {
                    subject: subject.clone(),
                    since_secs: *since,
                    resolution_secs: *resolution,
                })
                .await?,
            render::stats,
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_host(client: &EngineClient, command: &HostCommand, out: Output) -> anyhow::Result<()> {
    match command {
        HostCommand::Probe { address } => out.show(
            &client
                .probe_host(ops::ProbeHost {
                    address: address.clone(),
                })
                .await?,
            |k| format!("{address} presents key {}\n", k.fingerprint),
        ),
        HostCommand::Add {
            address,
            token,
            fingerprint,
            replace,
        } => out.show(
            &client
                .add_host(ops::AddHost {
                    address: address.clone(),
                    token: token.clone(),
                    fingerprint: fingerprint.clone(),
                    replace: *replace,
                })
                .await?,
            |e| format!("enrolled {} with key {}\n", e.id, e.fingerprint),
        ),
        HostCommand::Drain { host, pause: false } => out.show(
            &client
                .drain_host(ops::DrainHost { host: host.clone() })
                .await?,
            |d| render::drain(host, d.paused, &d.counts),
        ),
        HostCommand::Drain { host, pause: true } => out.show(
            &client
                .pause_drain(ops::PauseDrain { host: host.clone() })
                .await?,
            |m| match m {
                Some(m) => match &m.drain {
                    Some(counts) => render::drain(host, m.paused, counts),
                    None => format!("{host} is in maintenance, its drain paused\n"),
                },
                None => format!("{host} is not in maintenance\n"),
            },
        ),
        HostCommand::Undrain { host } => out.show(
            &client
                .undrain_host(ops::UndrainHost { host: host.clone() })
                .await?,
            |_| format!("{host} is out of maintenance and takes new work again\n"),
        ),
    }
}

async fn run_vm(
    client: &EngineClient,
    command: &VmCommand,
    out: Output,
) -> anyhow::Result<ExitCode> {
    use dunes_shared::protocol::{PowerAction, SnapshotAction};
    let power = |vm: &String, action| ops::PowerVm {
        vm: vm.clone(),
        action,
    };
    match command {
        VmCommand::Console {
            vm,
            read_only,
            linger_secs,
        } => {
            let linger = Duration::from_secs(*linger_secs);
            return match client {
                EngineClient::Socket { path, .. } => {
                    super::console::attach_local(path, vm, *read_only, linger).await
                }
                EngineClient::Remote { session, .. } => {
                    super::console::attach_remote(session, vm, *read_only, linger).await
                }
                EngineClient::InProcess(_) => {
                    anyhow::bail!("a console is attached through the control socket or --connect")
                }
            };
        }
        VmCommand::Create {
            name,
            template,
            image,
            disk_gib,
            uefi,
            user,
            ssh_key,
            user_data,
            host,
            vcpus,
            memory_mib,
            start,
        } => out.show(
            &client
                .create_vm(ops::CreateVm {
                    name: name.clone(),
                    template: template.clone().unwrap_or_default(),
                    host: host.clone(),
                    vcpus: *vcpus,
                    memory_mib: *memory_mib,
                    start: *start,
                    image: image.clone(),
                    disk_gib: *disk_gib,
                    uefi: *uefi,
                    user_data: user_data.as_deref().map(read_text).transpose()?,
                    user: user.clone(),
                    ssh_key: ssh_key.as_deref().map(read_text).transpose()?,
                })
                .await?,
            render::vm_state,
        )?,
        VmCommand::Start { vm } => out.show(
            &client.start_vm(ops::StartVm { vm: vm.clone() }).await?,
            render::vm_state,
        )?,
        VmCommand::Reboot { vm } => out.show(
            &client.power_vm(power(vm, PowerAction::Reboot)).await?,
            render::vm_state,
        )?,
        VmCommand::Pause { vm } => out.show(
            &client.power_vm(power(vm, PowerAction::Pause)).await?,
            render::vm_state,
        )?,
        VmCommand::Resume { vm } => out.show(
            &client.power_vm(power(vm, PowerAction::Resume)).await?,
            render::vm_state,
        )?,
        VmCommand::Stop { vm, force } => out.show(
            &client
                .stop_vm(ops::StopVm {
                    vm: vm.clone(),
                    force: *force,
                })
                .await?,
            render::vm_state,
        )?,
        VmCommand::Delete { vm } => out.show(
            &client.delete_vm(ops::DeleteVm { vm: vm.clone() }).await?,
            |d| format!("deleted {} on {}\n", d.deleted, d.host),
        )?,
        VmCommand::Set {
            vm,
            vcpus,
            memory_mib,
        } => out.show(
            &client
                .configure_vm(ops::ConfigureVm {
                    vm: vm.clone(),
                    vcpus: *vcpus,
                    memory_mib: *memory_mib,
                    autostart: None,
                })
                .await?,
            |c| render::vm_settings(&c.vm),
        )?,
        VmCommand::Eject { vm } => out.show(
            &client.eject_vm(ops::EjectVm { vm: vm.clone() }).await?,
            |c| render::vm_settings(&c.vm),
        )?,
        VmCommand::Autostart { vm, state } => out.show(
            &client
                .configure_vm(ops::ConfigureVm {
                    vm: vm.clone(),
                    vcpus: None,
                    memory_mib: None,
                    autostart: Some(*state == OnOff::On),
                })
                .await?,
            |c| render::vm_settings(&c.vm),
        )?,
        VmCommand::Clone { vm, name, to } => out.show(
            &client
                .clone_vm(ops::CloneVm {
                    vm: vm.clone(),
                    name: name.clone(),
                    to: to.clone(),
                })
                .await?,
            render::vm_clone,
        )?,
        VmCommand::Snapshot(command) => {
            let (vm, action, snapshot) = match command {
                SnapshotCommand::List { vm } => (vm, SnapshotAction::List, None),
                SnapshotCommand::Create { vm, snapshot } => {
                    (vm, SnapshotAction::Create, Some(snapshot))
                }
                SnapshotCommand::Revert { vm, snapshot } => {
                    (vm, SnapshotAction::Revert, Some(snapshot))
                }
                SnapshotCommand::Delete { vm, snapshot } => {
                    (vm, SnapshotAction::Delete, Some(snapshot))
                }
            };
            out.show(
                &client
                    .snapshot_vm(ops::SnapshotVm {
                        vm: vm.clone(),
                        action,
                        snapshot: snapshot.cloned(),
                    })
                    .await?,
                render::snapshots,
            )?
        }
        VmCommand::Screenshot { vm, out: file } => {
            let shot = client
                .screenshot_vm(ops::ScreenshotVm { vm: vm.clone() })
                .await?;
            let png = hex::decode(&shot.png)
                .map_err(|e| anyhow::anyhow!("the screenshot does not decode: {e}"))?;
            dunes_shared::durable::write_file(file, &png, 0o644)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
            out.show(&shot, |s| {
                format!(
                    "wrote {} ({}×{}, the screen of {}/{})\n",
                    file.display(),
                    s.width,
                    s.height,
                    s.host,
                    s.vm
                )
            })?;
        }
        VmCommand::Exec {
            vm,
            timeout_secs,
            command,
        } => {
            let output = client
                .exec_in_vm(ops::GuestExec {
                    vm: vm.clone(),
                    command: command.join(" "),
                    timeout_secs: *timeout_secs,
                })
                .await?;
            out.show(&output, |o| {
                eprint!("{}", o.stderr);
                o.stdout.clone()
            })?;
            // The guest command's own exit code, as ssh would give it; 124 when it timed out
            // (as timeout(1) says it).
            return Ok(match output.exit_code {
                Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
                None => {
                    eprintln!("the command was still running at the timeout");
                    ExitCode::from(124)
                }
            });
        }
        VmCommand::Migrate {
            vm,
            to,
            dry_run,
            limit_mbps,
            compress,
        } => {
            let compress = match compress {
                Compress::Auto => None,
                Compress::On => Some(true),
                Compress::Off => Some(false),
            };
            if *dry_run {
                let check = client
                    .check_migration(ops::CheckMigration {
                        vm: vm.clone(),
                        to: to.clone(),
                        limit_mbps: *limit_mbps,
                        compress,
                    })
                    .await?;
                out.show(&check, render::migration_check)?;
                // A dry run tells by its exit code whether the VM can go.
                if !check.can_go {
                    return Ok(ExitCode::from(2));
                }
            } else {
                out.show(
                    &client
                        .migrate_vm(ops::MigrateVm {
                            vm: vm.clone(),
                            to: to.clone(),
                            limit_mbps: *limit_mbps,
                            compress,
                        })
                        .await?,
                    render::migration,
                )?
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_service(
    client: &EngineClient,
    command: &ServiceCommand,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let name_of = |name: &String| name.clone();
    match command {
        ServiceCommand::Create { file, replace } => out.show(
            &client
                .define_service(ops::DefineService {
                    source: read_service_file(file)?,
                    replace: *replace,
                })
                .await?,
            |d| format!("service {} defined\n", d.name),
        )?,
        ServiceCommand::Plan { name, place } => {
            let plan = client
                .plan_service(ops::PlanService {
                    name: name_of(name),
                    place: place.clone(),
                })
                .await?;
            out.show(&plan, render::plan)?;
            // A plan tells by its exit code whether deploying it would do anything.
            return Ok(if !plan.feasible {
                ExitCode::from(2)
            } else if plan.changes {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            });
        }
        ServiceCommand::Deploy {
            name,
            fingerprint,
            place,
        } => out.show(
            &client
                .deploy_service(ops::DeployService {
                    name: name_of(name),
                    fingerprint: fingerprint.clone(),
                    place: place.clone(),
                })
                .await?,
            render::report,
        )?,
        ServiceCommand::Start { name } => out.show(
            &client
                .start_service(ops::StartService {
                    name: name_of(name),
                })
                .await?,
            render::report,
        )?,
        ServiceCommand::Stop { name } => out.show(
            &client
                .stop_service(ops::StopService {
                    name: name_of(name),
                })
                .await?,
            render::report,
        )?,
        ServiceCommand::Delete { name } => out.show(
            &client
                .delete_service(ops::DeleteService {
                    name: name_of(name),
                })
                .await?,
            render::report,
        )?,
        ServiceCommand::Show { name } => out.show(
            &client
                .show_service(ops::ShowService {
                    name: name_of(name),
                })
                .await?,
            |s| s.source.clone().unwrap_or_default(),
        )?,
        ServiceCommand::Adopt { name, app, vm } => out.show(
            &client
                .adopt_vm(ops::AdoptVm {
                    name: name_of(name),
                    app: app.clone(),
                    vm: vm.clone(),
                })
                .await?,
            |a| {
                format!(
                    "{} on {} is now instance {}-{} of service {}\n",
                    a.vm, a.host, a.application, a.index, a.service
                )
            },
        )?,
        ServiceCommand::Move { name, to_site } => out.show(
            &client
                .move_service(ops::MoveService {
                    name: name_of(name),
                    site: to_site.clone(),
                })
                .await?,
            |m| {
                format!(
                    "service {name} is moving to site {to_site}: {} first; follow it with `services` and `migrations`\n",
                    if m.moving.was_running {
                        "stopping it"
                    } else {
                        "it is stopped, so migrating"
                    }
                )
            },
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_autoscale(
    client: &EngineClient,
    command: &AutoscaleCommand,
    out: Output,
) -> anyhow::Result<()> {
    match command {
        AutoscaleCommand::Set {
            target,
            metric,
            above,
            below,
            period,
            periods,
            cooldown,
            min,
            max,
        } => out.show(
            &client
                .set_autoscale(ops::SetAutoscale {
                    target: target.clone(),
                    metric: metric.clone(),
                    above: *above,
                    below: *below,
                    period_secs: *period,
                    periods: *periods,
                    cooldown_secs: *cooldown,
                    min: *min,
                    max: *max,
                })
                .await?,
            |view| {
                format!(
                    "autoscaling of {target}: {}\n",
                    view.as_ref().map_or("-", |v| v.rule.as_str())
                )
            },
        ),
        AutoscaleCommand::Show => out
            .show(&client.autoscaling(ops::ListAutoscale {}).await?, |a| {
                render::autoscaling(a)
            }),
        AutoscaleCommand::Replay { target, since } => out.show(
            &client
                .replay_autoscale(ops::ReplayAutoscale {
                    target: target.clone(),
                    since_secs: *since,
                })
                .await?,
            render::replay,
        ),
        AutoscaleCommand::Remove { target } => out.show(
            &client
                .remove_autoscale(ops::RemoveAutoscale {
                    target: target.clone(),
                })
                .await?,
            |_| format!("autoscaling of {target} removed; its instances stay as they are\n"),
        ),
    }
}

async fn run_operator(
    client: &EngineClient,
    command: &OperatorCommand,
    out: Output,
) -> anyhow::Result<()> {
    use dunes_shared::{model::OperatorName, pki};
    match command {
        OperatorCommand::Add {
            name,
            role,
            scopes,
            consoles,
            no_consoles,
            out: file,
            address,
        } => {
            if file.exists() {
                anyhow::bail!(
                    "{} exists; remove it or write the credential elsewhere",
                    file.display()
                );
            }
            let operator = OperatorName::new(name.clone())?;
            let engine = match address {
                Some(address) => address.clone(),
                None => engine_address(client).await?,
            };
            // The key is made here and never travels: the engine signs its request.
            let key_pem = pki::generate_key_pem()?;
            let csr = pki::operator_csr(&key_pem, &operator)?;
            let issued = client
                .add_operator(ops::AddOperator {
                    name: name.clone(),
                    role: role.clone(),
                    scopes: scopes.clone(),
                    csr_pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)),
                    consoles: match (consoles, no_consoles) {
                        (true, _) => Some(true),
                        (_, true) => Some(false),
                        _ => None,
                    },
                })
                .await?;
            let credential = Credential {
                operator,
                engine,
                key_pem,
                certificate_pem: issued.certificate_pem.clone(),
                ca_pem: issued.ca_pem.clone(),
            };
            credential.write(file).map_err(|e| {
                anyhow::anyhow!(
                    "operator {name} was added, but {}; revoke them and add them again",
                    dunes_shared::error_chain(&e)
                )
            })?;
            out.show(&issued.operator, |o| {
                format!(
                    "operator {} added as {}; their credential is {} (keep it private): dunes-console ctl --connect {} hosts\n",
                    o.name,
                    o.role,
                    file.display(),
                    file.display()
                )
            })
        }
        OperatorCommand::List => out.show(&client.operators(ops::ListOperators {}).await?, |o| {
            render::operators(o)
        }),
        OperatorCommand::Revoke { name } => out.show(
            &client
                .revoke_operator(ops::RevokeOperator { name: name.clone() })
                .await?,
            |o| format!("operator {} revoked; their sessions are closed\n", o.name),
        ),
    }
}

/// Pushes an image; on a terminal, a line for each host whenever its share grows by a tenth
/// (asked of the engine each second). A script gets the answer alone.
async fn push_with_progress(
    client: &EngineClient,
    request: ops::PushImage,
) -> anyhow::Result<Vec<crate::api::views::ImagePushView>> {
    let name = request.name.clone();
    let push = client.push_image(request);
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return Ok(push.await?);
    }
    tokio::pin!(push);
    let mut told = std::collections::BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            done = &mut push => return Ok(done?),
            _ = tick.tick() => {
                let Ok(images) = client.images(ops::ListImages {}).await else {
                    continue;
                };
                let sending = images
                    .iter()
                    .filter(|i| i.name.as_str() == name)
                    .flat_map(|i| &i.sending);
                for s in sending {
                    let tenth = s.done_bytes.saturating_mul(10) / s.total_bytes.max(1);
                    if told.insert(s.host.clone(), tenth) != Some(tenth) {
                        eprintln!(
                            "{}: {} of {} MiB sent",
                            s.host,
                            s.done_bytes >> 20,
                            s.total_bytes.div_ceil(1 << 20)
                        );
                    }
                }
            }
        }
    }
}

async fn run_image(
    client: &EngineClient,
    command: &ImageCommand,
    out: Output,
) -> anyhow::Result<()> {
    match command {
        ImageCommand::Import { file, name } => {
            if let EngineClient::Remote { session, .. } = client {
                // The engine is elsewhere: the file's bytes go to it.
                let last = std::sync::atomic::AtomicU64::new(0);
                let imported = session
                    .upload_image(name, file, |sent, total| {
                        // A line each 10 % on a terminal; a script gets the answer alone.
                        let tenth = sent * 10 / total.max(1);
                        if std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && tenth > last.swap(tenth, std::sync::atomic::Ordering::Relaxed)
                        {
                            eprintln!(
                                "sent {} of {} MiB",
                                sent.div_ceil(1 << 20),
                                total.div_ceil(1 << 20)
                            );
                        }
                    })
                    .await?;
                return out.show(&imported, |i| {
                    format!(
                        "image {} imported: {}, {} MiB for the guest, {} MiB on disk\n",
                        i.name,
                        i.format,
                        i.virtual_bytes.div_ceil(1 << 20),
                        i.allocated_bytes.div_ceil(1 << 20)
                    )
                });
            }
            let path = std::fs::canonicalize(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            out.show(
                &client
                    .import_image(ops::ImportImage {
                        name: name.clone(),
                        path: path.to_string_lossy().into_owned(),
                        upload_bytes: None,
                    })
                    .await?,
                |i| {
                    format!(
                        "image {} imported: {}, {} MiB for the guest, {} MiB on disk\n",
                        i.name,
                        i.format,
                        i.virtual_bytes.div_ceil(1 << 20),
                        i.allocated_bytes.div_ceil(1 << 20)
                    )
                },
            )
        }
        ImageCommand::Push { name, host, site } => out.show(
            &push_with_progress(
                client,
                ops::PushImage {
                    name: name.clone(),
                    host: host.clone(),
                    site: site.clone(),
                },
            )
            .await?,
            |reports| {
                reports
                    .iter()
                    .map(|r| {
                        if r.held {
                            format!("{}: holds image {name} already, nothing sent\n", r.host)
                        } else if r.resumed_from > 0 {
                            format!(
                                "{}: {} MiB sent, going on from {} MiB\n",
                                r.host,
                                r.sent_bytes.div_ceil(1 << 20),
                                r.resumed_from >> 20
                            )
                        } else {
                            format!("{}: {} MiB sent\n", r.host, r.sent_bytes.div_ceil(1 << 20))
                        }
                    })
                    .collect()
            },
        ),
        ImageCommand::Delete { name } => out.show(
            &client
                .delete_image(ops::DeleteImage { name: name.clone() })
                .await?,
            |i| format!("image {} deleted\n", i.name),
        ),
    }
}

/// Where operators reach the engine, as it listens; an address that names no one host
/// (0.0.0.0) must be given.
async fn engine_address(client: &EngineClient) -> anyhow::Result<String> {
    let info = client.engine_info(ops::EngineInfo {}).await?;
    let Some(listening) = info.operator_address else {
        anyhow::bail!(
            "the engine serves no operator endpoint; start it with --operator-listen ADDR:PORT"
        );
    };
    match listening.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => anyhow::bail!(
            "the engine listens on {a}; pass --address HOST:PORT, as operators reach it"
        ),
        _ => Ok(listening),
    }
}

async fn run_audit(
    client: &EngineClient,
    args: &AuditArgs,
    out: Output,
) -> anyhow::Result<ExitCode> {
    if let Some(AuditCommand::Verify) = args.command {
        let check = client.verify_audit(ops::VerifyAudit {}).await?;
        out.show(&check, |c| match &c.problem {
            None => format!("the audit log's {} records are intact\n", c.records),
            Some(problem) => format!("the audit log is broken: {problem}\n"),
        })?;
        return Ok(if check.intact {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let lines = client
        .audit(ops::ListAudit {
            since_secs: args.since,
            operator: args.operator.clone(),
        })
        .await?;
    if args.jsonl {
        for line in &lines {
            println!("{}", serde_json::to_string(line)?);
        }
    } else {
        out.show(&lines, |l| render::audit(l))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A small text file the operator names (a key, user-data), read where ctl runs.
fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    if meta.len() > dunes_shared::cloud_init::USER_DATA_MAX_BYTES as u64 {
        anyhow::bail!(
            "{} is {} bytes; it may be at most 64 KiB",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
}
