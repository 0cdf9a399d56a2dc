//! `netlab pki`: a development PKI for labs and tests — a trust domain's CA and X509-SVIDs
//! for core, PoPs and stores, written as PEM files (see `fedmesh_transport::pki`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use fedmesh_transport::pki::{DevPkiSpec, write_dev_pki};

/// Options of `netlab pki`.
#[derive(Debug, clap::Args)]
pub(crate) struct PkiArgs {
    /// Directory to write the CA, the trust bundle and every SVID into.
    #[arg(long)]
    pub out: PathBuf,
    /// Trust domain (stored lowercased).
    #[arg(long, default_value = "fl.example")]
    pub trust_domain: String,
    /// A metro that gets a PoP SVID (`/pop/<metro>`); repeatable.
    #[arg(long = "pop", value_name = "METRO")]
    pub pops: Vec<String>,
    /// A store that gets a store SVID (`/store/<region>/<store>`); repeatable.
    #[arg(long = "store", value_name = "REGION/STORE", value_parser = parse_store)]
    pub stores: Vec<(String, String)>,
    /// Lifetime of each SVID, in hours.
    #[arg(long, default_value_t = 24)]
    pub svid_hours: u64,
    /// Lifetime of the CA, in days.
    #[arg(long, default_value_t = 365)]
    pub ca_days: u64,
}

fn parse_store(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((region, id)) if !region.is_empty() && !id.is_empty() && !id.contains('/') => {
            Ok((region.to_owned(), id.to_owned()))
        }
        _ => Err(format!("{text:?} is not REGION/STORE")),
    }
}

/// Writes the PKI and prints where each identity went.
pub(crate) fn run(args: &PkiArgs) -> Result<String> {
    let spec = DevPkiSpec {
        trust_domain: args.trust_domain.clone(),
        ca_lifetime: Duration::from_secs(args.ca_days.saturating_mul(86_400)),
        svid_lifetime: Duration::from_secs(args.svid_hours.saturating_mul(3_600)),
        pops: args.pops.clone(),
        stores: args.stores.clone(),
    };
    let layout = write_dev_pki(&args.out, &spec)
        .with_context(|| format!("writing the dev PKI to {}", args.out.display()))?;
    let mut out = format!("trust bundle: {}\n", layout.bundle.display());
    out += &format!("core: {}\n", layout.core.chain.display());
    for (metro, paths) in &layout.pops {
        out += &format!("pop {metro}: {}\n", paths.chain.display());
    }
    for ((region, store), paths) in &layout.stores {
        out += &format!("store {region}/{store}: {}\n", paths.chain.display());
    }
    Ok(out)
}
