//! What a [`super::Cluster`] is made of: how many workers and API replicas, their names
//! and settings, and the `exec` programs every worker offers. Settings are `TASKPOD_*`
//! variables, exactly as an operator would give them.

/// One `exec` program: its name (what a task's payload names) and a shell script.
/// `{dir}` in the script is replaced by the folder the programs live in, where they
/// may also keep logs.
#[derive(Clone, Debug)]
pub struct ProgramSpec {
    pub name: String,
    pub script: String,
}

#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// `TASKPOD_NAME`; also the handle the test uses.
    pub name: String,
    /// On top of the cluster's settings for every worker.
    pub env: Vec<(String, String)>,
    /// Reach Postgres (pool and lock session) through a [`crate::proxy::FaultProxy`].
    pub via_proxy: bool,
    /// With `via_proxy`: only the pool goes through the proxy, the lock session
    /// connects directly (a pooler in front of `store.url`, `lock.url` direct).
    pub lock_direct: bool,
    /// Run in a network namespace of its own, so that the network between it and
    /// Postgres and Redis can be cut ([`super::Netns`]). Not with `via_proxy`.
    pub netns: bool,
    /// Reach Redis through a [`crate::proxy::FaultProxy`] of its own. Not with `netns`.
    pub redis_via_proxy: bool,
}

#[derive(Clone, Debug)]
pub struct ApiSpec {
    pub name: String,
    pub env: Vec<(String, String)>,
    /// Reach Postgres through a [`crate::proxy::FaultProxy`].
    pub via_proxy: bool,
    /// Run in a network namespace of its own (it then listens on its namespace's
    /// address). Not with `via_proxy`.
    pub netns: bool,
    /// Reach Redis through a [`crate::proxy::FaultProxy`] of its own. Not with `netns`.
    pub redis_via_proxy: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    pub workers: Vec<WorkerSpec>,
    pub apis: Vec<ApiSpec>,
    /// Settings for every worker (a worker's own `env` wins).
    pub worker_env: Vec<(String, String)>,
    /// Settings for every API replica (a replica's own `env` wins).
    pub api_env: Vec<(String, String)>,
    pub programs: Vec<ProgramSpec>,
    /// Extra Postgres settings (`-c name=value`).
    pub postgres_settings: Vec<(String, String)>,
    /// Start without Redis (the workers and replicas run without a bus).
    pub no_redis: bool,
    /// Run the workers at their default tick, claim interval and settle time, as an
    /// operator would, rather than the harness's fast ones.
    pub default_timing: bool,
}

impl ClusterSpec {
    /// `workers` workers named `w1`, `w2`, ... and `apis` replicas named `api1`, ...
    pub fn new(workers: usize, apis: usize) -> Self {
        Self {
            workers: (1..=workers)
                .map(|i| WorkerSpec {
                    name: format!("w{i}"),
                    env: Vec::new(),
                    via_proxy: false,
                    lock_direct: false,
                    netns: false,
                    redis_via_proxy: false,
                })
                .collect(),
            apis: (1..=apis)
                .map(|i| ApiSpec {
                    name: format!("api{i}"),
                    env: Vec::new(),
                    via_proxy: false,
                    netns: false,
                    redis_via_proxy: false,
                })
                .collect(),
            ..Self::default()
        }
    }

    /// A setting for every worker.
    #[must_use]
    pub fn worker_env(mut self, key: &str, value: impl ToString) -> Self {
        self.worker_env.push((key.to_owned(), value.to_string()));
        self
    }

    /// A setting for every API replica.
    #[must_use]
    pub fn api_env(mut self, key: &str, value: impl ToString) -> Self {
        self.api_env.push((key.to_owned(), value.to_string()));
        self
    }

    /// A setting for one worker (by index).
    #[must_use]
    pub fn one_worker_env(mut self, index: usize, key: &str, value: impl ToString) -> Self {
        if let Some(w) = self.workers.get_mut(index) {
            w.env.push((key.to_owned(), value.to_string()));
        }
        self
    }

    /// An `exec` program every worker offers.
    #[must_use]
    pub fn program(mut self, name: &str, script: &str) -> Self {
        self.programs.push(ProgramSpec {
            name: name.to_owned(),
            script: script.to_owned(),
        });
        self
    }

    /// Route a worker (by index) to Postgres through a fault proxy.
    #[must_use]
    pub fn worker_via_proxy(mut self, index: usize) -> Self {
        if let Some(w) = self.workers.get_mut(index) {
            w.via_proxy = true;
        }
        self
    }

    /// Route a worker's pool (by index) through a fault proxy, and its lock session
    /// directly to Postgres: a pooler or sidecar that can fail on its own.
    #[must_use]
    pub fn worker_pool_via_proxy(mut self, index: usize) -> Self {
        if let Some(w) = self.workers.get_mut(index) {
            w.via_proxy = true;
            w.lock_direct = true;
        }
        self
    }

    /// Route an API replica (by index) to Postgres through a fault proxy.
    #[must_use]
    pub fn api_via_proxy(mut self, index: usize) -> Self {
        if let Some(a) = self.apis.get_mut(index) {
            a.via_proxy = true;
        }
        self
    }

    /// Route a worker (by index) to Redis through a fault proxy.
    #[must_use]
    pub fn worker_redis_via_proxy(mut self, index: usize) -> Self {
        if let Some(w) = self.workers.get_mut(index) {
            w.redis_via_proxy = true;
        }
        self
    }

    /// Route an API replica (by index) to Redis through a fault proxy.
    #[must_use]
    pub fn api_redis_via_proxy(mut self, index: usize) -> Self {
        if let Some(a) = self.apis.get_mut(index) {
            a.redis_via_proxy = true;
        }
        self
    }

    /// Run a worker (by index) in a network namespace of its own.
    #[must_use]
    pub fn worker_in_netns(mut self, index: usize) -> Self {
        if let Some(w) = self.workers.get_mut(index) {
            w.netns = true;
        }
        self
    }

    /// Run an API replica (by index) in a network namespace of its own.
    #[must_use]
    pub fn api_in_netns(mut self, index: usize) -> Self {
        if let Some(a) = self.apis.get_mut(index) {
            a.netns = true;
        }
        self
    }

    /// Workers at their default tick, claim interval and settle time.
    #[must_use]
    pub fn default_timing(mut self) -> Self {
        self.default_timing = true;
        self
    }

    #[must_use]
    pub fn postgres_setting(mut self, name: &str, value: impl ToString) -> Self {
        self.postgres_settings
            .push((name.to_owned(), value.to_string()));
        self
    }
}
