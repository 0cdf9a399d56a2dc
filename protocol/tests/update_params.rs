//! Parameter layout: the documented order, flattening by scope, and errors that name the
//! parameter at fault.

use fedmesh_protocol::params::{ParamError, ParamLayout, ParamMap, ParamSpec, Scope};
use proptest::prelude::*;

fn spec(name: &str, shape: &[usize], local: bool) -> ParamSpec {
    ParamSpec {
        name: name.to_string(),
        shape: shape.to_vec(),
        local,
    }
}

/// An MLP whose head is local, listed out of order on purpose.
fn mlp() -> ParamLayout {
    ParamLayout::new([
        spec("head.weight", &[1, 2], true),
        spec("body.weight", &[2, 3], false),
        spec("body.bias", &[2], false),
        spec("Scale", &[], false),
    ])
    .unwrap()
}

fn mlp_values() -> ParamMap {
    ParamMap::from([
        ("head.weight".to_string(), vec![10.0, 11.0]),
        (
            "body.weight".to_string(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        ),
        ("body.bias".to_string(), vec![-1.0, -2.0]),
        ("Scale".to_string(), vec![0.5]),
    ])
}

#[test]
fn orders_parameters_by_name_bytewise() {
    // Byte order puts upper case first ('S' = 0x53 < 'b' = 0x62) and a name before its
    // extensions ("body.bias" < "body.weight" because 'b' < 'w').
    let layout = mlp();
    let names: Vec<&str> = layout.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["Scale", "body.bias", "body.weight", "head.weight"]);
}

#[test]
fn shared_scope_leaves_out_local_parameters() {
    let layout = mlp();
    assert_eq!(layout.len(Scope::All), 11);
    assert_eq!(layout.len(Scope::Shared), 9);

    // Scale, then body.bias, then body.weight row-major; head.weight is local.
    let shared = layout.flatten(&mlp_values(), Scope::Shared).unwrap();
    assert_eq!(shared, [0.5, -1.0, -2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);

    let all = layout.flatten(&mlp_values(), Scope::All).unwrap();
    assert_eq!(&all[9..], [10.0, 11.0]);
}

#[test]
fn unflatten_inverts_flatten_for_each_scope() {
    let layout = mlp();
    let values = mlp_values();
    let all = layout.flatten(&values, Scope::All).unwrap();
    assert_eq!(layout.unflatten(&all, Scope::All).unwrap(), values);

    let shared = layout.flatten(&values, Scope::Shared).unwrap();
    let back = layout.unflatten(&shared, Scope::Shared).unwrap();
    assert!(!back.contains_key("head.weight"));
    assert_eq!(back["body.weight"], values["body.weight"]);
}

#[test]
fn rejects_values_that_do_not_match_the_layout() {
    let layout = mlp();

    let mut missing = mlp_values();
    missing.remove("body.bias");
    let err = layout.flatten(&missing, Scope::Shared).unwrap_err();
    assert_eq!(
        err,
        ParamError::Missing {
            name: "body.bias".into()
        }
    );
    assert!(err.to_string().contains("body.bias"));

    let mut unknown = mlp_values();
    unknown.insert("extra".into(), vec![0.0]);
    let err = layout.flatten(&unknown, Scope::All).unwrap_err();
    assert_eq!(
        err,
        ParamError::Unknown {
            name: "extra".into()
        }
    );

    let mut short = mlp_values();
    short.insert("body.weight".into(), vec![1.0; 5]);
    let err = layout.flatten(&short, Scope::All).unwrap_err();
    assert!(
        matches!(err, ParamError::Size { ref name, expected: 6, actual: 5, .. }
        if name == "body.weight")
    );

    let err = layout.unflatten(&[0.0; 10], Scope::Shared).unwrap_err();
    assert_eq!(
        err,
        ParamError::FlatLength {
            scope: Scope::Shared,
            expected: 9,
            actual: 10
        }
    );
}

#[test]
fn rejects_duplicate_names_and_overflowing_shapes() {
    let err = ParamLayout::new([spec("w", &[1], false), spec("w", &[2], true)]).unwrap_err();
    assert_eq!(err, ParamError::Duplicate { name: "w".into() });

    let err = ParamLayout::new([spec("huge", &[usize::MAX, 2], false)]).unwrap_err();
    assert_eq!(
        err,
        ParamError::SizeOverflow {
            name: "huge".into()
        }
    );
}

proptest! {
    #[test]
    fn layout_order_does_not_depend_on_input_order(
        sizes in prop::collection::btree_map("[a-z.]{1,6}", (1usize..5, any::<bool>()), 1..8),
        rotate in 0usize..8,
    ) {
        let mut specs: Vec<ParamSpec> =
            sizes.iter().map(|(n, &(len, local))| spec(n, &[len], local)).collect();
        let sorted = ParamLayout::new(specs.clone()).unwrap();
        let r = rotate % specs.len();
        specs.rotate_left(r);
        specs.reverse();
        prop_assert_eq!(ParamLayout::new(specs).unwrap(), sorted);
    }
}
