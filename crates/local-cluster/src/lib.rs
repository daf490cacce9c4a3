//! The parts of a local taskpod cluster, run from the system's binaries rather than
//! downloaded (they must work offline and in sandboxes): `taskpod dev` assembles a
//! cluster to try taskpod with, `taskpod bench --dev` one to measure.
//!
//! - [`postgres`]: a private PostgreSQL (`initdb`, `pg_ctl`) in a data folder;
//! - [`redis`]: a private Redis (`redis-server`), the status bus;
//! - [`processes`]: the `taskpod-worker` nodes and `taskpod-api` replicas, started on
//!   free loopback ports and stopped with a drain;
//! - [`migrate`]: brings a database to the schema this binary was built with (also
//!   `taskpod migrate`, on any database);
//! - [`signals`]: SIGINT and SIGTERM, which stop a local cluster cleanly.
//!
//! How the parts are put together (how many of each, which settings, when to stop
//! them) is the caller's.

pub mod migrate;
pub mod postgres;
pub mod processes;
pub mod redis;
pub mod signals;
