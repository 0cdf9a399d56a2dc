//! The development PKI writes SVIDs that load as X509-SVIDs with the expected IDs.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use fedmesh_transport::pki::{DevPkiSpec, PkiError, write_dev_pki};
use fedmesh_transport::{FileSvidSource, SvidSource};

fn spec() -> DevPkiSpec {
    DevPkiSpec {
        trust_domain: "FL.example".into(),
        ca_lifetime: Duration::from_secs(30 * 86400),
        svid_lifetime: Duration::from_secs(2 * 3600),
        pops: vec!["chicago".into()],
        stores: vec![
            ("emea".into(), "0042".into()),
            ("us-west".into(), "0007".into()),
        ],
    }
}

#[test]
fn writes_loadable_svids_for_core_pops_and_stores() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = write_dev_pki(dir.path(), &spec())?;

    let mut ids = vec![
        FileSvidSource::load(layout.core.clone())?
            .svid()
            .spiffe_id()
            .to_string(),
    ];
    for (_, paths) in &layout.pops {
        ids.push(
            FileSvidSource::load(paths.clone())?
                .svid()
                .spiffe_id()
                .to_string(),
        );
    }
    for (_, paths) in &layout.stores {
        ids.push(
            FileSvidSource::load(paths.clone())?
                .svid()
                .spiffe_id()
                .to_string(),
        );
    }
    // The trust domain was given as FL.example; SPIFFE IDs carry it lowercased.
    assert_eq!(
        ids,
        [
            "spiffe://fl.example/core",
            "spiffe://fl.example/pop/chicago",
            "spiffe://fl.example/store/emea/0042",
            "spiffe://fl.example/store/us-west/0007",
        ]
    );
    Ok(())
}

#[test]
fn svids_get_the_chosen_lifetime() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = write_dev_pki(dir.path(), &spec())?;
    let svid = FileSvidSource::load(layout.core)?.svid();
    let left = svid.not_after().duration_since(SystemTime::now())?;
    // Two hours from issuance, to the second the certificate can express.
    assert!(left > Duration::from_secs(2 * 3600 - 60) && left <= Duration::from_secs(2 * 3600));
    Ok(())
}

#[test]
fn refuses_store_names_that_are_not_one_path_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bad = spec();
    bad.stores = vec![("emea".into(), "../0042".into())];
    assert!(matches!(
        write_dev_pki(dir.path(), &bad),
        Err(PkiError::InvalidSegment(_))
    ));
}
