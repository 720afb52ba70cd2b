//! Reading the records a gateway wrote to its SQLite database.

use std::path::Path;
use std::time::{Duration, Instant};

use super::gateway::Gateway;

impl Gateway {
    /// Opens the records database read-only.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(&self.db_path).unwrap()
    }

    /// Waits until the table has at least `n` rows, then returns all rows as JSON objects.
    pub fn records(&self, n: usize) -> Vec<serde_json::Value> {
        records_in(&self.db_path, n)
    }
}

/// [`Gateway::records`] of the database file `db` (a gateway started with its own `-database`).
pub fn records_in(db: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = read_rows(db);
        if rows.len() >= n || Instant::now() > deadline {
            assert!(
                rows.len() >= n,
                "expected {n} records, found {}: {rows:#?}",
                rows.len()
            );
            return rows;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Every row of `records`, column name → value.
pub fn read_rows(db: &Path) -> Vec<serde_json::Value> {
    let Ok(conn) = rusqlite::Connection::open(db) else {
        return vec![];
    };
    let Ok(mut stmt) = conn.prepare("SELECT * FROM records ORDER BY id") else {
        return vec![];
    };
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let rows = stmt.query_map([], |row| {
        let mut obj = serde_json::Map::new();
        for (i, name) in names.iter().enumerate() {
            let v = match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                rusqlite::types::ValueRef::Integer(n) => n.into(),
                rusqlite::types::ValueRef::Real(f) => f.into(),
                rusqlite::types::ValueRef::Text(t) => {
                    String::from_utf8_lossy(t).into_owned().into()
                }
                rusqlite::types::ValueRef::Blob(b) => format!("<blob {}>", b.len()).into(),
            };
            obj.insert(name.clone(), v);
        }
        Ok(serde_json::Value::Object(obj))
    });
    match rows {
        Ok(r) => r.filter_map(Result::ok).collect(),
        Err(_) => vec![],
    }
}
