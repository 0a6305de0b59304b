// `sqlx::migrate!` embeds the migration files at compile time but cannot tell cargo to
// watch them on stable Rust: without this, a new migration is missed by incremental
// builds (sqlx's documented fix).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
