//! Update codecs: how a store shrinks an update before it leaves the store.
//!
//! The stages (in progress): bit-packing of fixed-width integers, used by the
//! secure-aggregation code for ring elements and by the quantisers.

pub mod bitpack;
