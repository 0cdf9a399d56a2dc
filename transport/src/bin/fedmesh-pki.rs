//! `fedmesh-pki`: writes a development PKI (a trust domain's CA and SVIDs for core, PoPs
//! and stores) for labs and tests.
//!
//! ```text
//! fedmesh-pki --out DIR [--trust-domain fl.example] [--pop METRO]... \
//!     [--store REGION/STORE]... [--svid-hours 24] [--ca-days 365]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};

const USAGE: &str = "usage: fedmesh-pki --out DIR [--trust-domain TD] [--pop METRO]... \
                     [--store REGION/STORE]... [--svid-hours H] [--ca-days D]";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fedmesh-pki: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let mut out = None;
    let mut spec = DevPkiSpec {
        trust_domain: "fl.example".into(),
        ca_lifetime: Duration::from_secs(365 * 86400),
        svid_lifetime: Duration::from_secs(24 * 3600),
        pops: Vec::new(),
        stores: Vec::new(),
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--trust-domain" => spec.trust_domain = value()?,
            "--pop" => spec.pops.push(value()?),
            "--store" => {
                let store = value()?;
                let (region, id) = store
                    .split_once('/')
                    .ok_or_else(|| format!("--store {store}: expected REGION/STORE"))?;
                spec.stores.push((region.to_owned(), id.to_owned()));
            }
            "--svid-hours" => spec.svid_lifetime = Duration::from_secs(3600 * number(&value()?)?),
            "--ca-days" => spec.ca_lifetime = Duration::from_secs(86400 * number(&value()?)?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let out = out.ok_or_else(|| format!("--out is required\n{USAGE}"))?;
    let layout = write_dev_pki(&out, &spec).map_err(|e| e.to_string())?;
    println!("trust bundle: {}", layout.bundle.display());
    println!("core: {}", layout.core.chain.display());
    for (metro, paths) in &layout.pops {
        println!("pop {metro}: {}", paths.chain.display());
    }
    for ((region, store), paths) in &layout.stores {
        println!("store {region}/{store}: {}", paths.chain.display());
    }
    Ok(())
}

fn number(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a whole number"))
}
