//! Every operation of the API against every role, and the VM operations against scopes: what
//! the engine refuses, exactly, and the sentence it says. The check is the one every request
//! goes through ([`Caller::permits`]), on a fleet of two hosts: `lsn-1` in site lausanne with
//! the VM `vm0`, and `gva-1` in site geneva.

use std::sync::Arc;

use dunes_shared::{
    model::OperatorName,
    pki::Fingerprint,
    protocol::{PowerAction, SnapshotAction},
};

use super::{Caller, OPERATION_NAMES, Operation, ops::*};
use crate::engine::{
    Snapshot,
    operators::access::{Role, Scope},
    statistics::capacity::tests::host,
};

type Permits = Box<dyn Fn(&Caller, &Snapshot) -> Result<(), String>>;

/// One operation as a request, the least role that may run it, and whether it changes the
/// VM `vm0` on lsn-1 (so that a site scope decides).
struct Case {
    name: &'static str,
    action: &'static str,
    least: Role,
    on_vm: bool,
    permits: Permits,
}

fn case<O: Operation + 'static>(request: O, least: Role, on_vm: bool) -> Case {
    Case {
        name: O::NAME,
        action: O::ACTION,
        least,
        on_vm,
        permits: Box::new(move |caller, snapshot| {
            caller
                .permits(&request, snapshot)
                .map_err(|refusal| refusal.message)
        }),
    }
}

fn every_operation() -> Vec<Case> {
    use Role::{Admin, Operator, Viewer};
    let vm = || "lsn-1/vm0".to_string();
    vec![
        case(ListHosts {}, Viewer, false),
        case(ListVms {}, Viewer, false),
        case(ListEvents { limit: 5 }, Viewer, false),
        case(
            ProbeHost {
                address: "10.0.0.9:7443".into(),
            },
            Admin,
            false,
        ),
        case(
            AddHost {
                address: "10.0.0.9:7443".into(),
                token: "t".into(),
                fingerprint: None,
                replace: false,
            },
            Admin,
            false,
        ),
        case(
            DrainHost {
                host: "lsn-1".into(),
            },
            Admin,
            false,
        ),
        case(
            PauseDrain {
                host: "lsn-1".into(),
            },
            Admin,
            false,
        ),
        case(
            UndrainHost {
                host: "lsn-1".into(),
            },
            Admin,
            false,
        ),
        case(
            CreateVm {
                name: "new".into(),
                template: "tiny".into(),
                host: "lsn-1".into(),
                vcpus: None,
                memory_mib: None,
                start: false,
                image: None,
                disk_gib: None,
                uefi: false,
                user_data: None,
                user: None,
                ssh_key: None,
            },
            Operator,
            true,
        ),
        case(StartVm { vm: vm() }, Operator, true),
        case(
            PowerVm {
                vm: vm(),
                action: PowerAction::Reboot,
            },
            Operator,
            true,
        ),
        case(
            StopVm {
                vm: vm(),
                force: true,
            },
            Operator,
            true,
        ),
        case(
            ConfigureVm {
                vm: vm(),
                vcpus: Some(2),
                memory_mib: None,
                autostart: None,
            },
            Operator,
            true,
        ),
        case(
            CloneVm {
                vm: vm(),
                name: "copy".into(),
                to: None,
            },
            Operator,
            true,
        ),
        case(
            SnapshotVm {
                vm: vm(),
                action: SnapshotAction::Create,
                snapshot: Some("s1".into()),
            },
            Operator,
            true,
        ),
        case(
            GuestExec {
                vm: vm(),
                command: "uptime".into(),
                timeout_secs: 5,
            },
            Operator,
            true,
        ),
        case(DeleteVm { vm: vm() }, Operator, true),
        case(
            MigrateVm {
                vm: vm(),
                to: "lsn-1".into(),
                limit_mbps: None,
                compress: None,
            },
            Operator,
            true,
        ),
        case(
            CheckMigration {
                vm: vm(),
                to: "gva-1".into(),
                limit_mbps: None,
                compress: None,
            },
            Viewer,
            false,
        ),
        case(ListMigrations {}, Viewer, false),
        case(CancelMigration { id: 1 }, Operator, false),
        case(Forecast { site: None }, Viewer, false),
        case(
            Stats {
                subject: "lsn-1".into(),
                since_secs: 60,
                resolution_secs: None,
            },
            Viewer,
            false,
        ),
        case(LatestValues {}, Viewer, false),
        case(
            Cost {
                by: "site".into(),
                since_secs: 3600,
            },
            Viewer,
            false,
        ),
        case(
            SetAutoscale {
                target: "shop/web".into(),
                metric: "cpu".into(),
                above: 80.0,
                below: 20.0,
                period_secs: 60,
                periods: 3,
                cooldown_secs: 300,
                min: 1,
                max: 4,
            },
            Operator,
            false,
        ),
        case(
            RemoveAutoscale {
                target: "shop/web".into(),
            },
            Operator,
            false,
        ),
        case(ListAutoscale {}, Viewer, false),
        case(
            ReplayAutoscale {
                target: "shop/web".into(),
                since_secs: 3600,
            },
            Viewer,
            false,
        ),
        case(
            WhatIfDrain {
                host: "lsn-1".into(),
            },
            Viewer,
            false,
        ),
        case(
            WhatIfDeploy {
                name: "shop".into(),
            },
            Viewer,
            false,
        ),
        case(ListServices {}, Viewer, false),
        case(
            ShowService {
                name: "shop".into(),
            },
            Viewer,
            false,
        ),
        case(
            DefineService {
                source: "name = \"shop\"".into(),
                replace: false,
            },
            Admin,
            false,
        ),
        case(
            PlanService {
                name: "shop".into(),
                place: Vec::new(),
            },
            Viewer,
            false,
        ),
        case(
            DeployService {
                name: "shop".into(),
                fingerprint: None,
                place: Vec::new(),
            },
            Operator,
            false,
        ),
        case(
            StartService {
                name: "shop".into(),
            },
            Operator,
            false,
        ),
        case(
            StopService {
                name: "shop".into(),
            },
            Operator,
            false,
        ),
        case(
            DeleteService {
                name: "shop".into(),
            },
            Admin,
            false,
        ),
        case(
            AdoptVm {
                name: "shop".into(),
                app: "web".into(),
                vm: vm(),
            },
            Operator,
            false,
        ),
        case(
            MoveService {
                name: "shop".into(),
                site: "geneva".into(),
            },
            Operator,
            false,
        ),
        case(
            AddOperator {
                name: "nina".into(),
                role: "viewer".into(),
                scopes: Vec::new(),
                csr_pem: String::new(),
                consoles: None,
            },
            Admin,
            false,
        ),
        case(ListOperators {}, Viewer, false),
        case(
            RevokeOperator {
                name: "nina".into(),
            },
            Admin,
            false,
        ),
        // Every operator renews their own certificate.
        case(
            RenewOperator {
                csr_pem: String::new(),
            },
            Viewer,
            false,
        ),
        case(EngineInfo {}, Viewer, false),
        case(
            ListAudit {
                since_secs: None,
                operator: None,
            },
            Viewer,
            false,
        ),
        case(VerifyAudit {}, Viewer, false),
        case(ListImages {}, Viewer, false),
        case(ListNetworks {}, Viewer, false),
        case(
            ImportImage {
                name: "debian".into(),
                path: "/srv/debian.qcow2".into(),
                upload_bytes: None,
            },
            Admin,
            false,
        ),
        case(
            DeleteImage {
                name: "debian".into(),
            },
            Admin,
            false,
        ),
        case(
            ConsoleVm {
                vm: vm(),
                read_only: false,
            },
            Operator,
            true,
        ),
        case(
            ScreenVm {
                vm: vm(),
                read_only: false,
            },
            Operator,
            true,
        ),
        case(ScreenshotVm { vm: vm() }, Operator, true),
        case(EjectVm { vm: vm() }, Operator, true),
        case(
            PushImage {
                name: "debian".into(),
                host: Some("lsn-1".into()),
                site: None,
            },
            Operator,
            false,
        ),
    ]
}

fn fleet() -> Snapshot {
    Snapshot {
        hosts: vec![
            Arc::new(host("lsn-1", "lausanne", 8, 16384, &[(2, 2048)])),
            Arc::new(host("gva-1", "geneva", 8, 16384, &[])),
        ],
        ..Snapshot::default()
    }
}

fn caller(name: &str, role: Role, scopes: &[&str]) -> Caller {
    Caller {
        name: OperatorName::new(name).unwrap(),
        fingerprint: Fingerprint([3; 32]),
        role,
        scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect(),
        consoles: crate::engine::operators::access::consoles_by_default(role),
    }
}

/// Opening consoles and screens: the operations the console permission gives.
const CONSOLE_CASES: &[&str] = &["vm-console", "vm-screen", "vm-screenshot"];

#[test]
fn consoles_and_screens_go_by_their_own_permission() {
    let fleet = fleet();
    let mut viewer = caller("vic", Role::Viewer, &[]);
    viewer.consoles = true;
    let mut operator = caller("otto", Role::Operator, &[]);
    operator.consoles = false;
    let cases: Vec<Case> = every_operation()
        .into_iter()
        .filter(|c| CONSOLE_CASES.contains(&c.name))
        .collect();
    assert_eq!(cases.len(), CONSOLE_CASES.len());
    for case in cases {
        assert_eq!((case.permits)(&viewer, &fleet), Ok(()), "{}", case.name);
        assert_eq!(
            (case.permits)(&operator, &fleet),
            Err(format!(
                "operator otto may not {}: they have no console permission (operator add --consoles gives it)",
                case.action
            )),
            "{}",
            case.name
        );
    }
    // The permission opens consoles only: the viewer still changes nothing else.
    assert!(
        viewer
            .permits(
                &StopVm {
                    vm: "lsn-1/vm0".into(),
                    force: false
                },
                &fleet
            )
            .is_err()
    );
}

#[test]
fn every_operation_is_in_the_matrix_once() {
    let mut names: Vec<&str> = every_operation().iter().map(|c| c.name).collect();
    names.sort_unstable();
    let mut all = OPERATION_NAMES.to_vec();
    all.sort_unstable();
    assert_eq!(names, all);
}

#[test]
fn each_role_is_refused_exactly_what_it_may_not_do_and_told_why() {
    let fleet = fleet();
    for role in [Role::Viewer, Role::Operator, Role::Admin] {
        let who = caller("casey", role, &[]);
        for case in every_operation() {
            let answer = (case.permits)(&who, &fleet);
            if role >= case.least {
                assert_eq!(answer, Ok(()), "{} runs {}", role.as_str(), case.name);
                continue;
            }
            let why = match case.least {
                _ if CONSOLE_CASES.contains(&case.name) => {
                    "they have no console permission (operator add --consoles gives it)"
                }
                Role::Admin => "admin only",
                _ => "operators and admins only",
            };
            assert_eq!(
                answer,
                Err(format!(
                    "{} casey may not {}: {why}",
                    role.as_str(),
                    case.action
                )),
                "{} is refused {}",
                role.as_str(),
                case.name
            );
        }
    }
}

#[test]
fn a_site_scope_limits_every_change_to_a_vm_to_that_site() {
    let fleet = fleet();
    let here = caller("gina", Role::Operator, &["site:lausanne"]);
    let elsewhere = caller("gina", Role::Operator, &["site:geneva"]);
    let other_service = caller("gina", Role::Operator, &["service:shop"]);
    for case in every_operation().into_iter().filter(|c| c.on_vm) {
        assert_eq!((case.permits)(&here, &fleet), Ok(()), "{}", case.name);
        let target = if case.name == "vm-create" {
            "new"
        } else {
            "vm0"
        };
        assert_eq!(
            (case.permits)(&elsewhere, &fleet),
            Err(format!(
                "operator gina may not {} on {target}: outside site:geneva",
                case.action
            )),
            "{}",
            case.name
        );
        assert_eq!(
            (case.permits)(&other_service, &fleet),
            Err(format!(
                "operator gina may not {} on {target}: outside service:shop",
                case.action
            )),
            "{}",
            case.name
        );
    }
    // Reads are not limited.
    for case in every_operation()
        .into_iter()
        .filter(|c| c.least == Role::Viewer)
    {
        assert_eq!((case.permits)(&elsewhere, &fleet), Ok(()), "{}", case.name);
    }
    // Both ends of a migration count: from lausanne to geneva needs both sites.
    let to_geneva = MigrateVm {
        vm: "lsn-1/vm0".into(),
        to: "gva-1".into(),
        limit_mbps: None,
        compress: None,
    };
    assert_eq!(
        here.permits(&to_geneva, &fleet).map_err(|e| e.message),
        Err("operator gina may not migrate VMs on host gva-1: outside site:lausanne".into())
    );
    let both = caller("gina", Role::Operator, &["site:lausanne", "site:geneva"]);
    assert_eq!(
        both.permits(&to_geneva, &fleet).map_err(|e| e.message),
        Ok(())
    );
    // An image goes only to hosts of the operator's sites.
    let push = |host: Option<&str>, site: Option<&str>| PushImage {
        name: "debian".into(),
        host: host.map(str::to_string),
        site: site.map(str::to_string),
    };
    assert_eq!(
        here.permits(&push(Some("lsn-1"), None), &fleet)
            .map_err(|e| e.message),
        Ok(())
    );
    assert_eq!(
        here.permits(&push(None, Some("geneva")), &fleet)
            .map_err(|e| e.message),
        Err("operator gina may not push images on host gva-1: outside site:lausanne".into())
    );
}

#[test]
fn a_service_scope_limits_changes_to_that_services_operations() {
    let fleet = fleet();
    let shop = caller("sam", Role::Operator, &["service:shop"]);
    let crm = caller("sam", Role::Operator, &["service:crm"]);
    let on_shop = [
        "autoscale-set",
        "autoscale-remove",
        "service-deploy",
        "service-start",
        "service-stop",
        "service-move",
    ];
    let cases: Vec<Case> = every_operation()
        .into_iter()
        .filter(|c| on_shop.contains(&c.name))
        .collect();
    assert_eq!(cases.len(), on_shop.len());
    for case in cases {
        assert_eq!((case.permits)(&shop, &fleet), Ok(()), "{}", case.name);
        let refused = (case.permits)(&crm, &fleet).expect_err(case.name);
        assert!(
            refused.starts_with(&format!("operator sam may not {} on ", case.action))
                && refused.ends_with(": outside service:crm"),
            "{}: {refused}",
            case.name
        );
    }
    // Adopting takes a VM in: the VM, which belongs to no service yet, is outside the scope.
    let adopt = every_operation()
        .into_iter()
        .find(|c| c.name == "service-adopt")
        .unwrap();
    assert_eq!(
        (adopt.permits)(&shop, &fleet),
        Err("operator sam may not adopt VMs into services on vm0: outside service:shop".into())
    );
}
