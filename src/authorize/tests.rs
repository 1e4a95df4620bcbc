use super::*;
use crate::error::ErrorCode;
use crate::key::KeyId;

fn scoped(scopes: &str, account: &str, expires_at: Option<OffsetDateTime>) -> Principal {
    Principal::scoped(
        KeyId::new("key_caller"),
        "caller",
        "o1",
        account,
        scopes.parse().unwrap(),
        expires_at,
    )
}

fn facts<'a>(
    scopes: &'a ScopeSet,
    account: &'a str,
    expires_at: Option<OffsetDateTime>,
) -> KeyFacts<'a> {
    KeyFacts {
        owner: "o1",
        account,
        scopes,
        expires_at,
        limits: UsageLimits::NONE,
        allowed_networks: None,
        lineage: mine(),
    }
}

/// A lineage in the caller's subtree: a child of `key_caller`.
fn mine() -> &'static [KeyId] {
    Box::leak(Box::new([
        KeyId::new("key_child"),
        KeyId::new("key_caller"),
    ]))
}

fn code(result: Result<(), AuthError>) -> Option<ErrorCode> {
    result.err().map(|e| e.code())
}

#[test]
fn the_table_has_a_row_for_every_operation() {
    use Operation::*;
    let kinds: Vec<_> = [
        List,
        Get,
        Create,
        Rotate,
        Revoke,
        Update,
        Delete,
        GetPool,
        SetPool,
        ListOwners,
        RegisterWebhook,
        ListWebhooks,
        ManageWebhook,
    ]
    .map(Operation::kind)
    .into();
    assert_eq!(
        kinds,
        [
            OperationKind::Read,
            OperationKind::Read,
            OperationKind::Power,
            OperationKind::Power,
            OperationKind::Power,
            OperationKind::Power,
            OperationKind::Master,
            OperationKind::Read,
            OperationKind::Master,
            OperationKind::Master,
            OperationKind::Power,
            OperationKind::Power,
            OperationKind::Power,
        ]
    );
}

#[test]
fn power_needs_cover_and_an_earlier_or_equal_expiry() {
    let soon = OffsetDateTime::now_utc() + time::Duration::days(1);
    let later = soon + time::Duration::days(1);
    let caller = scoped("api-keys:write ledgers:*", "a1", Some(soon));
    let narrow: ScopeSet = "ledgers:read".parse().unwrap();
    let broad: ScopeSet = "ledgers:read balances:read".parse().unwrap();
    for op in [
        Operation::Create,
        Operation::Rotate,
        Operation::Revoke,
        Operation::Update,
    ] {
        let key = |scopes, at| Target::Key {
            named_owner: None,
            key: Some(facts(scopes, "a1", at)),
        };
        let new = |scopes, at| Target::NewKey(facts(scopes, "a1", at));
        for target in [key(&narrow, Some(soon)), new(&narrow, Some(soon))] {
            assert_eq!(code(authorize(&caller, op, &target)), None, "{op:?}");
        }
        for target in [
            key(&broad, Some(soon)),
            key(&narrow, Some(later)),
            key(&narrow, None),
            new(&broad, Some(soon)),
            new(&narrow, None),
        ] {
            assert_eq!(
                code(authorize(&caller, op, &target)),
                Some(ErrorCode::ScopeEscalation),
                "{op:?} {target:?}"
            );
        }
    }
}

#[test]
fn a_scoped_key_stays_inside_its_owner_and_account() {
    let caller = scoped("api-keys:write *:*", "a1", None);
    let scopes: ScopeSet = "ledgers:read".parse().unwrap();
    let other_account = facts(&scopes, "a2", None);
    let other_owner = KeyFacts {
        owner: "o2",
        ..facts(&scopes, "a1", None)
    };
    for op in [Operation::Get, Operation::Rotate, Operation::Revoke] {
        for key in [other_account, other_owner] {
            let target = Target::Key {
                named_owner: None,
                key: Some(key),
            };
            assert_eq!(
                code(authorize(&caller, op, &target)),
                Some(ErrorCode::NotFound)
            );
        }
        let named = Target::Key {
            named_owner: Some("o2"),
            key: None,
        };
        assert_eq!(
            code(authorize(&caller, op, &named)),
            Some(ErrorCode::CrossOwnerAccess)
        );
    }
    for key in [other_account, other_owner] {
        assert_eq!(
            code(authorize(&caller, Operation::Create, &Target::NewKey(key))),
            Some(ErrorCode::CrossOwnerAccess)
        );
    }
    for (owner, account) in [("o2", Some("a1")), ("o1", Some("a2")), ("o1", None)] {
        assert_eq!(
            code(authorize(
                &caller,
                Operation::List,
                &Target::Keys { owner, account }
            )),
            Some(ErrorCode::CrossOwnerAccess),
            "{owner} {account:?}"
        );
    }
    let own = Target::Keys {
        owner: "o1",
        account: Some("a1"),
    };
    assert_eq!(code(authorize(&caller, Operation::List, &own)), None);
}

#[test]
fn granting_operations_hold_limits_to_the_callers() {
    use crate::limits::{Credits, RateLimit};
    let caller = scoped("api-keys:write ledgers:*", "a1", None).with_limits(UsageLimits {
        rate_limit: Some(RateLimit::new(10, 60)),
        credits: Some(Credits::new(50)),
    });
    let scopes: ScopeSet = "ledgers:read".parse().unwrap();
    let with = |rate: u32, credits: u64| KeyFacts {
        limits: UsageLimits {
            rate_limit: Some(RateLimit::new(rate, 60)),
            credits: Some(Credits::new(credits)),
        },
        ..facts(&scopes, "a1", None)
    };
    let key = |facts| Target::Key {
        named_owner: None,
        key: Some(facts),
    };
    for op in [Operation::Create, Operation::Update] {
        let target = |facts| match op {
            Operation::Create => Target::NewKey(facts),
            _ => key(facts),
        };
        assert_eq!(code(authorize(&caller, op, &target(with(10, 50)))), None);
        for looser in [with(11, 50), with(10, 51), facts(&scopes, "a1", None)] {
            assert_eq!(
                code(authorize(&caller, op, &target(looser))),
                Some(ErrorCode::ScopeEscalation),
                "{op:?} {looser:?}"
            );
        }
    }
    // Destroying or rotating a key does not grant limits: a creator that spent its credits can
    // still revoke the delegates it gave more to.
    for op in [Operation::Revoke, Operation::Rotate] {
        assert_eq!(code(authorize(&caller, op, &key(with(10, 500)))), None);
    }
    // The master key gives anything.
    assert_eq!(
        code(authorize(
            &Principal::master(),
            Operation::Create,
            &Target::NewKey(facts(&scopes, "a1", None))
        )),
        None
    );
}

#[test]
fn scopes_gate_before_anything_else() {
    let reader = scoped("api-keys:read ledgers:*", "a1", None);
    let nothing = scoped("ledgers:read", "a1", None);
    let unknown = Target::Key {
        named_owner: None,
        key: None,
    };
    assert_eq!(
        code(authorize(&reader, Operation::Get, &unknown)),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(
        code(authorize(&reader, Operation::Revoke, &unknown)),
        Some(ErrorCode::InsufficientPermissions)
    );
    assert_eq!(
        code(authorize(&nothing, Operation::Get, &unknown)),
        Some(ErrorCode::InsufficientPermissions)
    );
    let writer = scoped("api-keys:write *:*", "a1", None);
    assert_eq!(
        code(authorize(&writer, Operation::Delete, &unknown)),
        Some(ErrorCode::MasterKeyRequired)
    );
}

#[test]
fn the_master_key_may_do_everything_to_keys_that_exist() {
    let master = Principal::master();
    let scopes: ScopeSet = "*:*".parse().unwrap();
    let key = KeyFacts {
        owner: "o2",
        ..facts(&scopes, "a9", None)
    };
    for op in [
        Operation::Get,
        Operation::Rotate,
        Operation::Revoke,
        Operation::Delete,
    ] {
        let target = |named_owner| Target::Key {
            named_owner,
            key: Some(key),
        };
        assert_eq!(code(authorize(&master, op, &target(None))), None);
        assert_eq!(code(authorize(&master, op, &target(Some("o2")))), None);
        assert_eq!(
            code(authorize(&master, op, &target(Some("o1")))),
            Some(ErrorCode::NotFound)
        );
    }
}

#[test]
fn power_stays_inside_the_callers_subtree() {
    let caller = scoped("api-keys:write *:*", "a1", None);
    let scopes: ScopeSet = "ledgers:read".parse().unwrap();
    let lineage = |ids: &[&str]| -> &'static [KeyId] {
        Box::leak(
            ids.iter()
                .map(|id| KeyId::new(*id))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        )
    };
    let at = |ids| Target::Key {
        named_owner: None,
        key: Some(KeyFacts {
            lineage: lineage(ids),
            ..facts(&scopes, "a1", None)
        }),
    };
    let itself = at(&["key_caller", "key_parent"]);
    let grandchild = at(&["key_g", "key_c", "key_caller", "key_parent"]);
    let parent = at(&["key_parent"]);
    let sibling = at(&["key_sibling", "key_parent"]);
    let nephew = at(&["key_n", "key_sibling", "key_parent"]);
    let stranger = at(&["key_stranger"]);
    for op in [Operation::Rotate, Operation::Revoke, Operation::Update] {
        assert_eq!(code(authorize(&caller, op, &itself)), None, "{op:?}");
        assert_eq!(code(authorize(&caller, op, &grandchild)), None, "{op:?}");
        for outside in [parent, sibling, nephew, stranger] {
            assert_eq!(
                code(authorize(&caller, op, &outside)),
                Some(ErrorCode::OutsideSubtree),
                "{op:?} {outside:?}"
            );
            // Reading stays owner- and account-wide.
            assert_eq!(code(authorize(&caller, Operation::Get, &outside)), None);
            // The master key governs every subtree.
            assert_eq!(code(authorize(&Principal::master(), op, &outside)), None);
        }
    }
    // A new key is the caller's own child, and no one else's.
    let new = |ids| {
        Target::NewKey(KeyFacts {
            lineage: lineage(ids),
            ..facts(&scopes, "a1", None)
        })
    };
    assert_eq!(
        code(authorize(
            &caller,
            Operation::Create,
            &new(&["key_new", "key_caller"])
        )),
        None
    );
    assert_eq!(
        code(authorize(
            &caller,
            Operation::Create,
            &new(&["key_new", "key_other", "key_caller"])
        )),
        Some(ErrorCode::OutsideSubtree)
    );
}

#[test]
fn networks_only_narrow() {
    let office: Networks = "10.1.0.0/16".parse().unwrap();
    let desk: Networks = "10.1.7.0/24".parse().unwrap();
    let elsewhere: Networks = "192.0.2.0/24".parse().unwrap();
    let caller = scoped("api-keys:write *:*", "a1", None).with_networks(Some(office.clone()));
    let scopes: ScopeSet = "ledgers:read".parse().unwrap();
    let new = |networks| {
        Target::NewKey(KeyFacts {
            allowed_networks: networks,
            ..facts(&scopes, "a1", None)
        })
    };
    assert_eq!(
        code(authorize(&caller, Operation::Create, &new(Some(&desk)))),
        None
    );
    assert_eq!(
        code(authorize(&caller, Operation::Create, &new(Some(&office)))),
        None
    );
    for wider in [Some(&elsewhere), None] {
        assert_eq!(
            code(authorize(&caller, Operation::Create, &new(wider))),
            Some(ErrorCode::ScopeEscalation),
            "{wider:?}"
        );
    }
    // A caller allowed anywhere may narrow as it likes.
    let anywhere = scoped("api-keys:write *:*", "a1", None);
    assert_eq!(
        code(authorize(
            &anywhere,
            Operation::Create,
            &new(Some(&elsewhere))
        )),
        None
    );
}

#[test]
fn delegation_depth_is_capped() {
    let caller = scoped("api-keys:write *:*", "a1", None);
    let scopes: ScopeSet = "ledgers:read".parse().unwrap();
    let chain = |depth: usize| -> &'static [KeyId] {
        let mut ids = vec![KeyId::new("key_new"), KeyId::new("key_caller")];
        ids.extend((2..=depth).map(|i| KeyId::new(format!("key_up{i}"))));
        Box::leak(ids.into_boxed_slice())
    };
    let new = |depth| {
        Target::NewKey(KeyFacts {
            lineage: chain(depth),
            ..facts(&scopes, "a1", None)
        })
    };
    assert_eq!(
        new(MAX_DELEGATION_DEPTH).depth_for_test(),
        MAX_DELEGATION_DEPTH
    );
    assert_eq!(
        code(authorize(
            &caller,
            Operation::Create,
            &new(MAX_DELEGATION_DEPTH)
        )),
        None
    );
    assert_eq!(
        code(authorize(
            &caller,
            Operation::Create,
            &new(MAX_DELEGATION_DEPTH + 1)
        )),
        Some(ErrorCode::ScopeEscalation)
    );
}

impl Target<'_> {
    fn depth_for_test(&self) -> usize {
        match self {
            Target::NewKey(key) => key.depth(),
            _ => unreachable!(),
        }
    }
}
