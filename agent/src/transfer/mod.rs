//! Disk streams between agents for migrations: what crosses the wire (allocated extents in
//! hashed chunks, an image digest), the target's resumable, verified writer, and the source's
//! sender. The target's side of the protocol is served in `server::transfer`.

pub use dunes_shared::extents;
pub mod image;
pub mod receive;
pub mod send;
