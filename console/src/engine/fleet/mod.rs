//! The fleet: enrolled hosts and their links, the enrollment of new ones, and the changes
//! to one VM that its agent carries out.

mod calls;
pub mod client;
pub mod enroll;
pub(super) mod gate;
pub(super) mod hosts;
pub mod link;
pub mod site_traffic;
pub(in crate::engine) mod state;
pub mod vm_changes;
