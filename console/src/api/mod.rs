//! The engine's API: one request type per operation, its response type tied to it by
//! [`Operation`], and one [`EngineClient`] that carries them to an engine in this process or
//! through the control socket of a console that runs elsewhere on this machine. `ctl`, its
//! `--json` output and the tests go through it.

/// Every operation once, by the name of its client method and its request type: the
/// dispatch by name and the client's methods are made from it.
macro_rules! with_operations {
    ($make:ident) => {
        $make! {
        hosts => ListHosts,
        vms => ListVms,
        events => ListEvents,
        probe_host => ProbeHost,
        add_host => AddHost,
        drain_host => DrainHost,
        pause_drain => PauseDrain,
        undrain_host => UndrainHost,
        create_vm => CreateVm,
        start_vm => StartVm,
        power_vm => PowerVm,
        stop_vm => StopVm,
        configure_vm => ConfigureVm,
        eject_vm => EjectVm,
        clone_vm => CloneVm,
        snapshot_vm => SnapshotVm,
        exec_in_vm => GuestExec,
        delete_vm => DeleteVm,
        migrate_vm => MigrateVm,
        check_migration => CheckMigration,
        migrations => ListMigrations,
        cancel_migration => CancelMigration,
        forecast => Forecast,
        stats => Stats,
        latest_values => LatestValues,
        cost => Cost,
        set_autoscale => SetAutoscale,
        remove_autoscale => RemoveAutoscale,
        autoscaling => ListAutoscale,
        replay_autoscale => ReplayAutoscale,
        what_if_drain => WhatIfDrain,
        what_if_deploy => WhatIfDeploy,
        services => ListServices,
        show_service => ShowService,
        define_service => DefineService,
        plan_service => PlanService,
        deploy_service => DeployService,
        start_service => StartService,
        stop_service => StopService,
        delete_service => DeleteService,
        adopt_vm => AdoptVm,
        move_service => MoveService,
        add_operator => AddOperator,
        operators => ListOperators,
        revoke_operator => RevokeOperator,
        renew_operator => RenewOperator,
        engine_info => EngineInfo,
        audit => ListAudit,
        verify_audit => VerifyAudit,
        images => ListImages,
        networks => ListNetworks,
        import_image => ImportImage,
        delete_image => DeleteImage,
        push_image => PushImage,
        console_vm => ConsoleVm,
        screen_vm => ScreenVm,
        screenshot_vm => ScreenshotVm,
            }
    };
}

mod client;
pub mod console;
pub mod credential;
mod dispatch;
pub mod feed;
pub mod ops;
pub mod remote;
#[cfg(test)]
mod role_matrix;
pub mod screen;
pub mod session;
pub mod socket;
mod types;
mod upload;
pub mod views;

pub use client::EngineClient;
pub use dispatch::{OPERATION_NAMES, SessionEnd, dispatch, dispatch_as};
pub use types::{Answer, ApiError, ApiErrorCode, Caller, Envelope, Operation};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_are_unique() {
        let mut names = OPERATION_NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OPERATION_NAMES.len());
    }

    #[test]
    fn a_request_travels_as_its_name_beside_its_fields() {
        let envelope = Envelope::new(&ops::StopVm {
            vm: "web".into(),
            force: true,
        })
        .unwrap();
        assert_eq!(
            serde_json::to_string(&envelope).unwrap(),
            r#"{"cmd":"vm-stop","force":true,"vm":"web"}"#
        );
        let empty = Envelope::new(&ops::ListHosts {}).unwrap();
        assert_eq!(serde_json::to_string(&empty).unwrap(), r#"{"cmd":"hosts"}"#);
        let back: Envelope =
            serde_json::from_str(r#"{"cmd":"vm-stop","vm":"web","force":true}"#).unwrap();
        assert_eq!(back, envelope);
    }

    #[test]
    fn an_unknown_error_code_still_reads() {
        let e: ApiError =
            serde_json::from_str(r#"{"code":"quota-exceeded","message":"no room"}"#).unwrap();
        assert_eq!(e.code, ApiErrorCode::Other);
        assert_eq!(e.to_string(), "no room");
    }
}
