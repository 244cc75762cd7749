//! Service networks: each network's subnet and VXLAN identifier, chosen when a service that
//! declares it is defined, and each instance's address and MAC, chosen when it is deployed
//! and kept through stops, starts and migrations. `plan` holds the choices and the checks
//! (pure), `views` what the snapshot shows, the driver the engine's side.

mod driver;
pub mod hosts;
pub mod plan;
pub(in crate::engine) mod state;
pub mod views;

pub use state::NetworkRecord;
pub use views::{NetworkMemberView, NetworkView, PublishedPortView};
