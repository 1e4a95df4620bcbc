//! The key console at `/console`, offering the scopes this service's routes require.

use tower_api_keys::manage::console::Console;

/// The scopes the demo's routes require, with what each allows, for the console's create form.
const SCOPES: [(&str, &str); 8] = [
    ("ledgers:read", "List and read ledgers"),
    ("ledgers:write", "Create ledgers"),
    ("balances:read", "List and read balances"),
    ("balances:write", "Create balances"),
    ("transactions:read", "List and read transactions"),
    ("transactions:write", "Record transactions"),
    ("api-keys:read", "List and read API keys"),
    (
        "api-keys:write",
        "Create, rotate and revoke API keys (no wider than its own)",
    ),
];

/// The console, mounted outside the key layer (the page loads without a key; its API calls carry one).
pub(crate) fn console() -> Console {
    SCOPES.iter().fold(
        Console::new().title("Demo ledger API keys"),
        |console, (scope, description)| {
            console.scope(scope.parse().expect("a valid scope"), *description)
        },
    )
}
