//! Fedmesh's lab as a library: WAN emulation ([`wan`], [`relay`]), the anycast front
//! ([`anycast`]) and scenario files ([`scenario`]), used by the `netlab` binary and by
//! whole-mesh tests.
//!
//! Nothing here is part of a deployed mesh: it stands in for the network between stores and
//! PoPs on one machine, where the kernel offers no netem.

pub mod anycast;
pub mod relay;
pub mod scenario;
pub mod wan;
