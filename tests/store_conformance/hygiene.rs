//! The hygiene sweeper's store methods: `sweep` (expiring and idle keys across owners, in id
//! pages) and `record_notice` (insert-if-absent, once across instances).

use super::*;
use tower_api_keys::store::SweepQuery;

fn query(now: OffsetDateTime, after: Option<&str>, limit: u32) -> SweepQuery {
    SweepQuery {
        now,
        expiring_before: now + Duration::days(7),
        idle_before: now - Duration::days(90),
        after: after.map(KeyId::new),
        limit,
    }
}

pub(crate) async fn sweep_finds_expiring_and_idle_keys_in_pages(s: Stores) {
    let now = t(200 * 86_400);
    let day = Duration::days(1);
    let with = |id: &str, owner: &str, edit: &dyn Fn(&mut KeyRecord)| {
        let mut r = record(id, owner, "a");
        r.created_at = now - 10 * day;
        edit(&mut r);
        r
    };
    let records = [
        with("key_a_expiring", "o1", &|r| {
            r.expires_at = Some(now + 3 * day)
        }),
        with("key_b_later", "o1", &|r| {
            r.expires_at = Some(now + 30 * day)
        }),
        with("key_c_expired", "o2", &|r| r.expires_at = Some(now - day)),
        with("key_d_idle", "o2", &|r| r.created_at = now - 100 * day),
        with("key_e_used", "o2", &|r| {
            r.created_at = now - 100 * day;
            r.last_used_at = Some(now - 5 * day);
        }),
        with("key_f_used_long_ago", "o3", &|r| {
            r.created_at = now - 150 * day;
            r.last_used_at = Some(now - 120 * day);
        }),
        with("key_g_revoked", "o3", &|r| {
            r.expires_at = Some(now + day);
            r.revoked_at = Some(now - day);
        }),
        with("key_h_fresh", "o3", &|_| {}),
    ];
    for r in &records {
        s.a.insert(r, no_limits(), t(0)).await.unwrap();
    }
    let ids = |found: Vec<KeyRecord>| -> Vec<String> {
        found
            .into_iter()
            .map(|r| r.id.as_str().to_owned())
            .collect()
    };
    let all = ids(s.a.sweep(&query(now, None, 100)).await.unwrap());
    assert_eq!(all, ["key_a_expiring", "key_d_idle", "key_f_used_long_ago"]);
    // Paged by id, on the other instance too.
    let first = ids(s.b.sweep(&query(now, None, 2)).await.unwrap());
    assert_eq!(first, ["key_a_expiring", "key_d_idle"]);
    let rest = ids(s.b.sweep(&query(now, Some("key_d_idle"), 2)).await.unwrap());
    assert_eq!(rest, ["key_f_used_long_ago"]);
    let found = s.a.sweep(&query(now, None, 100)).await.unwrap();
    assert_eq!(found[0], records[0], "records come back whole");
}

pub(crate) async fn notices_are_recorded_once_across_instances(s: Stores) {
    let id = KeyId::new("key_n");
    let notice = "expiring:604800:1950000000";
    let (first, second) = tokio::join!(
        s.a.record_notice(&id, notice, t(0)),
        s.b.record_notice(&id, notice, t(1))
    );
    assert!(
        first.unwrap() ^ second.unwrap(),
        "exactly one of two racing instances records it"
    );
    assert!(!s.a.record_notice(&id, notice, t(2)).await.unwrap());
    assert!(
        s.b.record_notice(&id, "idle:1", t(2)).await.unwrap(),
        "another notice"
    );
    assert!(
        s.a.record_notice(&KeyId::new("key_m"), notice, t(2))
            .await
            .unwrap(),
        "another key"
    );
}
