//! A VM's power: reboot, pause and resume, and what its state does not allow.

use super::*;

/// Reboot, pause and resume through the agent's runtime: each leaves the VM as asked, and
/// what its state does not allow is refused with the reason and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_reboots_pauses_and_resumes_and_what_cannot_be_is_refused() {
    use dunes_shared::protocol::PowerAction;
    let dir = tempfile::tempdir().unwrap();
    let a = agent(dir.path(), "pw-a").await;
    let engine = engine_with(dir.path(), &a).await;
    let vm = VmName::new("pw").unwrap();
    engine
        .request(|reply| Command::CreateVm {
            host: a.host_id.clone(),
            spec: spec("pw"),
            start: true,
            reply,
        })
        .await
        .unwrap();
    let power = |action| {
        let (engine, host, vm) = (engine.clone(), a.host_id.clone(), vm.clone());
        async move {
            engine
                .request(|reply| Command::PowerVm {
                    host,
                    name: vm,
                    action,
                    reply,
                })
                .await
        }
    };
    assert_eq!(
        power(PowerAction::Reboot).await.unwrap().state,
        VmState::Running
    );
    assert_eq!(
        power(PowerAction::Pause).await.unwrap().state,
        VmState::Paused
    );
    let again = power(PowerAction::Pause).await.unwrap_err().to_string();
    assert!(
        again.contains("pw is paused; only a running VM pauses"),
        "{again}"
    );
    let reboot = power(PowerAction::Reboot).await.unwrap_err().to_string();
    assert!(reboot.contains("only a running VM reboots"), "{reboot}");
    assert_eq!(
        power(PowerAction::Resume).await.unwrap().state,
        VmState::Running
    );
    let resume = power(PowerAction::Resume).await.unwrap_err().to_string();
    assert!(resume.contains("only a paused VM resumes"), "{resume}");
    // The view follows, and the state stayed as the last success left it.
    let snap = engine
        .wait_for(Duration::from_secs(10), |s| {
            s.host(&a.host_id)
                .and_then(|h| h.vm(&vm))
                .is_some_and(|v| v.state == VmState::Running)
        })
        .await;
    assert!(snap.is_ok());
}
