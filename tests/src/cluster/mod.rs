//! [`Cluster`]: a whole taskpod cluster owned by one test, with handles for every fault
//! an operator or the network can inflict on it.
//!
//! It starts its own Postgres and Redis (never the shared test servers: they get
//! crashed and restarted), applies the migrations, writes the `exec` programs, and
//! starts N `taskpod-worker`s and M `taskpod-api`s from the binaries
//! `scripts/build-binaries.sh` built. Each member can be SIGKILLed, paused (SIGSTOP),
//! resumed, drained (SIGTERM) and restarted under the same name and settings (an API
//! replica on the same port, so clients reconnect); a worker's lock session can be
//! terminated from Postgres; Postgres can be crashed (`pg_ctl stop -m immediate`) and
//! started again on the same port and data; Redis can be SIGKILLed and restarted on the
//! same port, or paused (SIGSTOP: a black hole) and resumed. Any member can reach
//! Postgres or Redis through a [`FaultProxy`] of its own, or run in a
//! network namespace of its own ([`Netns`]) whose link to Postgres and Redis the
//! kernel cuts ([`Cluster::cut`]: both services or one, both ways or one).
//!
//! Everything is torn down on drop, panics included: members and the programs they
//! started are killed and reaped, then Postgres (immediate shutdown, waited for) and
//! Redis, then the scratch folder is removed (kept with `TASKPOD_CHAOS_KEEP=1`);
//! a member's namespace, veth pair and nft tables go with it. Every
//! child also gets a parent-death signal, so even a test killed without unwinding
//! leaves nothing running.

mod lock_session;
mod netns;
mod postgres;
mod process;
mod redis;
mod scratch;
mod spec;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use taskpod_proto::v1::task_service_client::TaskServiceClient;
use tonic::transport::{Channel, Endpoint};

pub use self::lock_session::{LOCK_APPLICATION_NAME, NODE_NAMESPACE};
pub use self::netns::{CutKind, Netns, Ports};
pub use self::postgres::{DATABASE, PgServer};
pub use self::process::ServerProcess;
pub use self::redis::RedisServer;
pub use self::scratch::{KEEP_ENV, Scratch};
pub use self::spec::{ApiSpec, ClusterSpec, ProgramSpec, WorkerSpec};
use crate::os;
use crate::proxy::FaultProxy;

/// The page-token key every replica of a cluster shares.
pub const PAGE_KEY: &str = "cluster-page-key-0123456789abcdef";
/// How long a drained process gets before SIGKILL.
pub const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// A worker or an API replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Worker,
    Api,
}

/// One worker or API replica: its process and, when it has them, its proxies to
/// Postgres and to Redis.
#[derive(Debug)]
pub struct Member {
    role: Role,
    process: ServerProcess,
    proxy: Option<FaultProxy>,
    redis_proxy: Option<FaultProxy>,
    /// Where an API replica listens (fixed across restarts).
    addr: Option<SocketAddr>,
    /// Its network namespace, when the spec asked for one. Declared last: it is
    /// removed after the process has died.
    netns: Option<Netns>,
}

impl Member {
    pub fn name(&self) -> &str {
        self.process.name()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn process(&self) -> &ServerProcess {
        &self.process
    }

    pub fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// Its proxy to Postgres, when the spec asked for one.
    pub fn proxy(&self) -> Option<&FaultProxy> {
        self.proxy.as_ref()
    }

    /// Its proxy to Redis, when the spec asked for one.
    pub fn redis_proxy(&self) -> Option<&FaultProxy> {
        self.redis_proxy.as_ref()
    }

    /// Its network namespace, when the spec asked for one.
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// A worker's node id as its latest start announced it. A worker that fenced
    /// itself registers a new incarnation without restarting, so the store may know a
    /// newer one: see [`Cluster::lock_session_of`] for a lookup by name.
    pub fn node_id(&self) -> Option<&str> {
        match self.role {
            Role::Worker => self.process.announced().split_whitespace().next(),
            Role::Api => None,
        }
    }

    /// An API replica's gRPC address.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// A client for an API replica. The channel connects lazily and reconnects, so it
    /// survives the replica's restarts.
    ///
    /// # Errors
    /// When this is not an API replica.
    pub fn client(&self) -> anyhow::Result<TaskServiceClient<Channel>> {
        let addr = self.addr.context("not an API replica")?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        Ok(TaskServiceClient::new(channel))
    }

    /// SIGKILL, reaped.
    ///
    /// # Errors
    /// When it does not die.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.process.kill().await
    }

    /// SIGSTOP.
    ///
    /// # Errors
    /// When it is not running.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.process.pause()
    }

    /// SIGCONT.
    ///
    /// # Errors
    /// When it is not running.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.process.resume()
    }

    /// SIGTERM, then SIGKILL after [`DRAIN_GRACE`]; the exit status if it drained.
    ///
    /// # Errors
    /// When it is not running.
    pub async fn terminate(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.process.terminate(DRAIN_GRACE).await
    }

    /// Kills it if it runs and starts it again, same name, same settings.
    ///
    /// # Errors
    /// When it does not start.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart().await
    }
}

/// A running cluster. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    workers: Vec<Member>,
    apis: Vec<Member>,
    pool: PgPool,
    redis: Option<RedisServer>,
    postgres: PgServer,
    programs: PathBuf,
    scratch: Scratch,
}

impl Cluster {
    /// Starts everything `spec` asks for and waits until every partition has an owner
    /// (when there are workers).
    ///
    /// # Errors
    /// When any part does not start; what started is torn down.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        let scratch = Scratch::new("cluster")?;
        let root = scratch.path().to_path_buf();
        let logs = Scratch::mkdir(&root.join("logs"))?;
        let programs = Scratch::mkdir(&root.join("programs"))?;
        let mut namespaces = make_namespaces(&spec).await?;
        let host_ends: Vec<(Ipv4Addr, String)> = namespaces
            .values()
            .map(|ns| (ns.host_addr(), ns.subnet()))
            .collect();
        let postgres = PgServer::start(&root, &spec.postgres_settings, &host_ends).await?;
        let db_url = postgres.url(DATABASE);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&db_url)
            .await
            .context("connect the oracle pool")?;
        taskpod_core::store::MIGRATOR
            .run(&pool)
            .await
            .context("apply the migrations")?;
        let redis = if spec.no_redis {
            None
        } else {
            let addrs: Vec<Ipv4Addr> = host_ends.iter().map(|(a, _)| *a).collect();
            Some(RedisServer::start(&Scratch::mkdir(&root.join("redis"))?, &addrs).await?)
        };
        let mut cluster = Self {
            workers: Vec::new(),
            apis: Vec::new(),
            pool,
            redis,
            postgres,
            programs,
            scratch,
        };
        let program_env = cluster.write_programs(&spec)?;
        for worker in &spec.workers {
            let netns = namespaces.remove(&worker.name);
            let member = cluster
                .start_worker(&spec, worker, netns, &program_env, &logs)
                .await?;
            cluster.workers.push(member);
        }
        for api in &spec.apis {
            let netns = namespaces.remove(&api.name);
            let member = cluster.start_api(&spec, api, netns, &logs).await?;
            cluster.apis.push(member);
        }
        if !cluster.workers.is_empty() {
            cluster
                .wait_partitions_owned(Duration::from_secs(60))
                .await?;
        }
        Ok(cluster)
    }

    fn write_programs(&self, spec: &ClusterSpec) -> anyhow::Result<Vec<(String, String)>> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.programs.to_str().context("non-UTF-8 temp dir")?;
        let mut env = Vec::new();
        for program in &spec.programs {
            let path = self.programs.join(format!("{}.sh", program.name));
            std::fs::write(&path, program.script.replace("{dir}", dir))
                .with_context(|| format!("write {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            env.push((
                format!("TASKPOD_HANDLERS__PROGRAMS__{}__PATH", program.name),
                path.display().to_string(),
            ));
        }
        Ok(env)
    }

    async fn proxy_for(&self, wanted: bool) -> anyhow::Result<(Option<FaultProxy>, String)> {
        if !wanted {
            return Ok((None, self.database_url()));
        }
        let upstream = SocketAddr::from(([127, 0, 0, 1], self.postgres.port()));
        let proxy = FaultProxy::start(upstream).await?;
        let url = format!("postgres://postgres@{}/{DATABASE}", proxy.addr());
        Ok((Some(proxy), url))
    }

    /// Where a member reaches Postgres and Redis: through its proxies, its namespace's
    /// host end, or directly.
    async fn routes_for(
        &self,
        via_proxy: bool,
        redis_via_proxy: bool,
        netns: Option<&Netns>,
    ) -> anyhow::Result<Routes> {
        if let Some(ns) = netns {
            return Ok(Routes {
                proxy: None,
                store_url: self.postgres.url_at(ns.host_addr(), DATABASE),
                redis_proxy: None,
                bus_url: self.redis.as_ref().map(|r| r.url_at(ns.host_addr())),
            });
        }
        let (proxy, store_url) = self.proxy_for(via_proxy).await?;
        let (redis_proxy, bus_url) = match &self.redis {
            Some(redis) if redis_via_proxy => {
                let upstream = SocketAddr::from(([127, 0, 0, 1], redis.port()));
                let proxy = FaultProxy::start(upstream).await?;
                let url = format!("redis://{}", proxy.addr());
                (Some(proxy), Some(url))
            }
            _ => (None, self.redis_url()),
        };
        Ok(Routes {
            proxy,
            store_url,
            redis_proxy,
            bus_url,
        })
    }

    async fn start_worker(
        &self,
        spec: &ClusterSpec,
        worker: &WorkerSpec,
        netns: Option<Netns>,
        program_env: &[(String, String)],
        logs: &Path,
    ) -> anyhow::Result<Member> {
        let routes = self
            .routes_for(worker.via_proxy, worker.redis_via_proxy, netns.as_ref())
            .await?;
        let (store_url, bus_url) = (&routes.store_url, &routes.bus_url);
        let mut env = vec![
            pair("TASKPOD_NAME", &worker.name),
            pair("TASKPOD_STORE__URL", store_url),
            pair("TASKPOD_HEALTH_LISTEN", "127.0.0.1:0"),
            pair("TASKPOD_METRICS_LISTEN", "127.0.0.1:0"),
        ];
        if !spec.default_timing {
            env.extend([
                pair("TASKPOD_TICK_MS", "100"),
                pair("TASKPOD_CLAIM_INTERVAL_MS", "200"),
                pair("TASKPOD_SETTLE_MS", "500"),
            ]);
        }
        if worker.lock_direct {
            env.push(pair("TASKPOD_LOCK__URL", &self.database_url()));
        }
        if let Some(url) = &bus_url {
            env.push(pair("TASKPOD_BUS__URL", url));
        }
        env.extend_from_slice(program_env);
        env.extend(spec.worker_env.iter().cloned());
        env.extend(worker.env.iter().cloned());
        let process = ServerProcess::start_under(
            &worker.name,
            netns.as_ref().map(Netns::launcher).unwrap_or_default(),
            crate::binary("taskpod-worker")?,
            env,
            logs.join(format!("{}.log", worker.name)),
            "taskpod-worker ",
        )
        .await?;
        Ok(Member {
            role: Role::Worker,
            process,
            proxy: routes.proxy,
            redis_proxy: routes.redis_proxy,
            addr: None,
            netns,
        })
    }

    async fn start_api(
        &self,
        spec: &ClusterSpec,
        api: &ApiSpec,
        netns: Option<Netns>,
        logs: &Path,
    ) -> anyhow::Result<Member> {
        let routes = self
            .routes_for(api.via_proxy, api.redis_via_proxy, netns.as_ref())
            .await?;
        let (store_url, bus_url) = (&routes.store_url, &routes.bus_url);
        // In a namespace it listens on the namespace's own address (a fresh namespace
        // has every port free); clients reach it over the veth pair.
        let ip = netns.as_ref().map_or(Ipv4Addr::LOCALHOST, Netns::ns_addr);
        let addr = SocketAddr::from((ip, os::free_port()?));
        let mut env = vec![
            pair("TASKPOD_LISTEN", &addr.to_string()),
            pair("TASKPOD_STORE__URL", store_url),
            pair("TASKPOD_AUTH__ENABLED", "false"),
            pair("TASKPOD_PAGE_TOKENS__CURRENT_KEY", PAGE_KEY),
            pair("TASKPOD_SHUTDOWN_GRACE_MS", "3000"),
        ];
        if let Some(url) = &bus_url {
            env.push(pair("TASKPOD_BUS__URL", url));
        }
        env.extend(spec.api_env.iter().cloned());
        env.extend(api.env.iter().cloned());
        let process = ServerProcess::start_under(
            &api.name,
            netns.as_ref().map(Netns::launcher).unwrap_or_default(),
            crate::binary("taskpod-api")?,
            env,
            logs.join(format!("{}.log", api.name)),
            "taskpod-api listening on ",
        )
        .await?;
        Ok(Member {
            role: Role::Api,
            process,
            proxy: routes.proxy,
            redis_proxy: routes.redis_proxy,
            addr: Some(addr),
            netns,
        })
    }

    /// The cluster's database, direct (not through any proxy).
    pub fn database_url(&self) -> String {
        self.postgres.url(DATABASE)
    }

    pub fn redis_url(&self) -> Option<String> {
        self.redis.as_ref().map(RedisServer::url)
    }

    /// The cluster's Redis, for commands (`CLIENT KILL`, `CONFIG SET`, `PUBSUB`).
    ///
    /// # Errors
    /// When the cluster runs without Redis.
    pub fn redis(&self) -> anyhow::Result<&RedisServer> {
        self.redis
            .as_ref()
            .context("the cluster runs without Redis")
    }

    /// A pool on the cluster's database for oracle queries. It reconnects by itself
    /// after a Postgres restart.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The scratch folder: `logs/<member>.log`, `pg/postgres.log`, `redis/`,
    /// `programs/`.
    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Where the `exec` programs live (`{dir}` in their scripts).
    pub fn programs_dir(&self) -> &Path {
        &self.programs
    }

    pub fn postgres(&self) -> &PgServer {
        &self.postgres
    }

    pub fn workers(&self) -> &[Member] {
        &self.workers
    }

    pub fn apis(&self) -> &[Member] {
        &self.apis
    }

    /// # Errors
    /// When no worker has this name.
    pub fn worker(&self, name: &str) -> anyhow::Result<&Member> {
        find(&self.workers, name)
    }

    /// # Errors
    /// When no worker has this name.
    pub fn worker_mut(&mut self, name: &str) -> anyhow::Result<&mut Member> {
        find_mut(&mut self.workers, name)
    }

    /// # Errors
    /// When no replica has this name.
    pub fn api(&self, name: &str) -> anyhow::Result<&Member> {
        find(&self.apis, name)
    }

    /// # Errors
    /// When no replica has this name.
    pub fn api_mut(&mut self, name: &str) -> anyhow::Result<&mut Member> {
        find_mut(&mut self.apis, name)
    }

    /// A client per API replica, in spec order.
    ///
    /// # Errors
    /// When an address is malformed (never, in practice).
    pub fn clients(&self) -> anyhow::Result<Vec<TaskServiceClient<Channel>>> {
        self.apis.iter().map(Member::client).collect()
    }

    /// The backend pid of a worker's dedicated lock session, if it has one now (see
    /// `lock_session.rs` for how it is found).
    ///
    /// # Errors
    /// When Postgres cannot be queried or there is no such worker.
    pub async fn lock_session_of(&self, worker: &str) -> anyhow::Result<Option<i32>> {
        let member = self.worker(worker)?;
        lock_session::find(&self.pool, worker, member.pid()).await
    }

    /// `pg_terminate_backend` on a worker's lock session: its advisory locks are gone at
    /// once, as after a network cut. Returns the backend pid, or `None` when the worker
    /// had no session to terminate.
    ///
    /// # Errors
    /// When Postgres cannot be queried.
    pub async fn terminate_lock_session(&self, worker: &str) -> anyhow::Result<Option<i32>> {
        let Some(pid) = self.lock_session_of(worker).await? else {
            return Ok(None);
        };
        let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&self.pool)
            .await?;
        Ok(done.then_some(pid))
    }

    /// `pg_ctl stop -m immediate`.
    ///
    /// # Errors
    /// When the server cannot be stopped.
    pub async fn crash_postgres(&mut self) -> anyhow::Result<()> {
        self.postgres.crash().await
    }

    /// Starts Postgres again on the same port and data directory.
    ///
    /// # Errors
    /// When it does not come up.
    pub async fn restart_postgres(&mut self) -> anyhow::Result<()> {
        self.postgres.restart().await
    }

    /// SIGKILL to Redis.
    ///
    /// # Errors
    /// When it does not die, or the cluster runs without Redis.
    pub async fn kill_redis(&mut self) -> anyhow::Result<()> {
        self.redis
            .as_mut()
            .context("the cluster runs without Redis")?
            .kill()
            .await
    }

    /// SIGSTOP to Redis: a black hole until [`Cluster::resume_redis`].
    ///
    /// # Errors
    /// When it is not running, or the cluster runs without Redis.
    pub fn pause_redis(&mut self) -> anyhow::Result<()> {
        self.redis
            .as_mut()
            .context("the cluster runs without Redis")?
            .pause()
    }

    /// SIGCONT to Redis.
    ///
    /// # Errors
    /// When it is not running, or the cluster runs without Redis.
    pub fn resume_redis(&mut self) -> anyhow::Result<()> {
        self.redis
            .as_mut()
            .context("the cluster runs without Redis")?
            .resume()
    }

    /// Starts Redis again on the same port.
    ///
    /// # Errors
    /// When it does not come up, or the cluster runs without Redis.
    pub async fn restart_redis(&mut self) -> anyhow::Result<()> {
        self.redis
            .as_mut()
            .context("the cluster runs without Redis")?
            .restart()
            .await
    }

    /// A session on another database of the cluster's server (`postgres`): its open
    /// transactions are another application's, which taskpod's change feed must not
    /// wait for.
    ///
    /// # Errors
    /// When Postgres refuses.
    pub async fn other_database(&self) -> anyhow::Result<sqlx::PgConnection> {
        use sqlx::Connection as _;
        Ok(sqlx::PgConnection::connect(&self.postgres.url("postgres")).await?)
    }

    /// Members that exited on their own since the last call (not killed or drained
    /// through a handle): a server that crashes under a fault. Each is reported once,
    /// with the end of its log; [`Cluster::heal`] starts it again.
    pub fn unexpected_exits(&mut self) -> Vec<(String, String, String)> {
        self.workers
            .iter_mut()
            .chain(self.apis.iter_mut())
            .filter_map(|m| {
                let status = m.process.exited_on_its_own()?;
                Some((
                    m.name().to_owned(),
                    status.to_string(),
                    os::log_tail(m.process.log_path(), 12),
                ))
            })
            .collect()
    }

    /// Cuts the network between member `name` (a worker or an API replica run in a
    /// namespace) and Postgres and/or Redis, as `kind` says, until
    /// [`Cluster::heal_cut`] or [`Cluster::heal`].
    ///
    /// # Errors
    /// When there is no such member, it has no namespace, or nft refuses.
    pub async fn cut(&self, name: &str, kind: CutKind) -> anyhow::Result<()> {
        let ports = Ports {
            postgres: self.postgres.port(),
            redis: self.redis.as_ref().map(RedisServer::port),
        };
        self.netns_of(name)?.cut(kind, ports).await
    }

    /// Removes the cut of member `name`.
    ///
    /// # Errors
    /// When there is no such member, it has no namespace, or nft refuses.
    pub async fn heal_cut(&self, name: &str) -> anyhow::Result<()> {
        self.netns_of(name)?.heal().await
    }

    fn netns_of(&self, name: &str) -> anyhow::Result<&Netns> {
        let member = find(&self.workers, name).or_else(|_| find(&self.apis, name))?;
        member
            .netns()
            .with_context(|| format!("{name} does not run in a network namespace"))
    }

    /// Undoes every fault: proxies pass, cuts are healed, Postgres and Redis run, every
    /// member runs (resumed, or started again if it died).
    ///
    /// # Errors
    /// When something cannot be started.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        self.postgres.restart().await?;
        if let Some(redis) = self.redis.as_mut() {
            redis.restart().await?;
        }
        for member in self.workers.iter_mut().chain(self.apis.iter_mut()) {
            for proxy in member.proxy.iter().chain(&member.redis_proxy) {
                proxy.heal();
            }
            if let Some(ns) = member
                .netns
                .as_ref()
                .filter(|ns| ns.current_cut().is_some())
            {
                ns.heal().await?;
            }
            member.process.ensure_running().await?;
        }
        Ok(())
    }

    /// Waits until every partition has an owner.
    ///
    /// # Errors
    /// When that does not happen within `timeout`.
    pub async fn wait_partitions_owned(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let free: Result<i64, _> =
                sqlx::query_scalar("SELECT count(*) FROM partitions WHERE owner_node IS NULL")
                    .fetch_one(&self.pool)
                    .await;
            if matches!(free, Ok(0)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("partitions still without an owner after {timeout:?}: {free:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every OS process the cluster is responsible for right now: members, the
    /// postmaster and its backends, Redis, and the `exec` programs' processes. For
    /// tests that check nothing outlives the cluster.
    pub async fn process_ids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .workers
            .iter()
            .chain(&self.apis)
            .filter_map(Member::pid)
            .collect();
        pids.extend(self.postgres.pid());
        pids.extend(self.redis.as_ref().and_then(RedisServer::pid));
        let backends: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity")
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
        pids.extend(backends.into_iter().filter_map(|p| u32::try_from(p).ok()));
        if let Some(dir) = self.programs.to_str() {
            pids.extend(os::pids_with_cmdline(dir));
        }
        pids
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Members first (their pods stop writing), then whatever their programs left
        // behind (an orphaned grandchild outlives its worker), then, as the fields
        // drop: the pool, Redis, Postgres (waited for), the folder.
        self.workers.clear();
        self.apis.clear();
        if let Some(dir) = self.programs.to_str() {
            os::kill_matching(dir);
        }
    }
}

/// A namespace for every member the spec puts in one, by member name.
async fn make_namespaces(spec: &ClusterSpec) -> anyhow::Result<BTreeMap<String, Netns>> {
    let wanted: Vec<String> = spec
        .workers
        .iter()
        .map(|w| (&w.name, w.netns, w.via_proxy || w.redis_via_proxy))
        .chain(
            spec.apis
                .iter()
                .map(|a| (&a.name, a.netns, a.via_proxy || a.redis_via_proxy)),
        )
        .filter(|(_, netns, _)| *netns)
        .map(|(name, _, via_proxy)| {
            if via_proxy {
                bail!("{name}: a member in a network namespace cannot use a fault proxy");
            }
            Ok(name.clone())
        })
        .collect::<anyhow::Result<_>>()?;
    let mut namespaces = BTreeMap::new();
    for name in wanted {
        let ns = tokio::task::spawn_blocking(Netns::create)
            .await
            .context("the namespace setup panicked")?
            .with_context(|| format!("{name}: could not get a network namespace"))?;
        namespaces.insert(name, ns);
    }
    Ok(namespaces)
}

/// Where a member reaches Postgres and Redis, and the proxies on the way.
struct Routes {
    proxy: Option<FaultProxy>,
    store_url: String,
    redis_proxy: Option<FaultProxy>,
    bus_url: Option<String>,
}

fn pair(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

fn find<'a>(members: &'a [Member], name: &str) -> anyhow::Result<&'a Member> {
    members
        .iter()
        .find(|m| m.name() == name)
        .with_context(|| format!("no member named {name:?}"))
}

fn find_mut<'a>(members: &'a mut [Member], name: &str) -> anyhow::Result<&'a mut Member> {
    members
        .iter_mut()
        .find(|m| m.name() == name)
        .with_context(|| format!("no member named {name:?}"))
}
