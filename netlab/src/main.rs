//! `netlab`: Fedmesh's lab (in progress).

fn main() {}
