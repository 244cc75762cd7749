//! Disk streams between agents for migrations. This far: what crosses the wire (allocated
//! extents in hashed chunks, an image digest) and the target's resumable, verified writer.
//! The `dunes-transfer/1` protocol with the console's one-time tickets comes next.

pub mod extents;
pub mod receive;
