//! The subscription manager: every subscription's state in memory, kept in
//! the storage backend's metadata, and the background task that issues
//! wakes, delivers webhooks and ends leases.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{Notify, OnceCell};
use tower::ServiceExt;
use tower_service::Service;

use super::config::{stream_path, Kind, Pattern, Spec};
use super::signing::{unix_ms, Claims, Signer};
use super::state::{Action, Link, Record};
use super::webhook::{Answer, Policy, Sender};
use super::Failure;
use crate::offset::Offset;
use crate::storage::{rules, Append, Listed, StorageRequest, StorageResponse, StreamErrorKind};
use crate::stream::ContentType;
use crate::BoxError;

/// Metadata keys of subscription records.
const RECORDS: &str = "__ds/subscriptions/";
/// Metadata key of the signing key's seed.
const SIGNING_KEY: &str = "__ds/signing-key";
/// How long a callback or claim token is valid. Fencing by generation and
/// wake, not expiry, is what ends a token's use.
const TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// How long the worker sleeps when nothing is scheduled.
const IDLE: Duration = Duration::from_secs(60);

type Result<T, E = Failure> = std::result::Result<T, E>;

/// Every subscription, and what the service and the worker share.
pub(crate) struct Manager<S> {
    storage: Mutex<S>,
    pub(crate) policy: Policy,
    pub(crate) public_root: Option<String>,
    sender: Sender,
    signer: OnceCell<Arc<Signer>>,
    registry: tokio::sync::Mutex<Registry>,
    /// Stream changes seen by the service since the registry last took
    /// them; kept outside the registry's lock so appends never wait on it.
    touched: Mutex<Vec<Touch>>,
    filter: RwLock<Filter>,
    kick: Arc<Notify>,
    started: AtomicBool,
}

#[derive(Default)]
struct Registry {
    loaded: bool,
    subs: BTreeMap<String, Entry>,
}

struct Entry {
    record: Record,
    pattern: Option<Pattern>,
}

enum Touch {
    Tail(String, Offset),
    Deleted(String),
}

/// What an append must check to know whether any subscription cares.
#[derive(Default)]
struct Filter {
    loaded: bool,
    patterns: Vec<Pattern>,
    paths: HashSet<String>,
}

impl Filter {
    fn wants(&self, path: &str) -> bool {
        !self.loaded || self.paths.contains(path) || self.patterns.iter().any(|p| p.matches(path))
    }
}

/// Work to do once the registry's lock is released.
enum Job {
    Deliver {
        id: String,
        generation: u64,
        wake_id: String,
        url: String,
        body: Bytes,
    },
    WakeEvent {
        stream: String,
        event: Bytes,
    },
}

impl<S> Manager<S>
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    pub(crate) fn new(storage: S, policy: Policy, public_root: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            storage: Mutex::new(storage),
            policy,
            public_root,
            sender: Sender::new(policy),
            signer: OnceCell::new(),
            registry: tokio::sync::Mutex::new(Registry::default()),
            touched: Mutex::new(Vec::new()),
            filter: RwLock::new(Filter::default()),
            kick: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
        })
    }

    /// Starts the background worker, once, if a Tokio runtime is running.
    pub(crate) fn start(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err()
            || self.started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        tokio::spawn(run(Arc::downgrade(self), self.kick.clone()));
    }

    /// A stream's tail moved (or it was created). Cheap when no
    /// subscription could care.
    pub(crate) fn observe(self: &Arc<Self>, path: &str, tail: Offset) {
        if self.read_filter().wants(path) {
            self.touch(Touch::Tail(path.to_owned(), tail));
        }
    }

    /// A stream was deleted.
    pub(crate) fn forget(self: &Arc<Self>, path: &str) {
        if self.read_filter().wants(path) {
            self.touch(Touch::Deleted(path.to_owned()));
        }
    }

    fn touch(self: &Arc<Self>, touch: Touch) {
        self.touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(touch);
        self.start();
        self.kick.notify_one();
    }

    fn read_filter(&self) -> std::sync::RwLockReadGuard<'_, Filter> {
        self.filter.read().unwrap_or_else(PoisonError::into_inner)
    }

    async fn call(&self, request: StorageRequest) -> Result<StorageResponse, BoxError> {
        let storage = self
            .storage
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        storage.oneshot(request).await.map_err(Into::into)
    }

    pub(crate) async fn signer(&self) -> Result<Arc<Signer>> {
        self.signer
            .get_or_try_init(|| async {
                let stored = match self
                    .call(StorageRequest::ListMeta {
                        prefix: SIGNING_KEY.into(),
                    })
                    .await
                {
                    Ok(StorageResponse::Meta(entries)) => entries,
                    Ok(_) => Vec::new(),
                    Err(e) => return Err(Failure::storage(e)),
                };
                if let Some(signer) = stored
                    .iter()
                    .find(|(k, _)| k == SIGNING_KEY)
                    .and_then(|(_, seed)| Signer::from_seed(seed))
                {
                    return Ok(Arc::new(signer));
                }
                let (signer, seed) = Signer::generate().map_err(|e| {
                    Failure::storage(format!("no randomness for a signing key: {e}").into())
                })?;
                self.set_meta(SIGNING_KEY, Some(Bytes::copy_from_slice(&seed)))
                    .await?;
                tracing::info!(kid = signer.kid(), "generated a webhook signing key");
                Ok(Arc::new(signer))
            })
            .await
            .cloned()
    }

    async fn set_meta(&self, key: &str, value: Option<Bytes>) -> Result<()> {
        match self
            .call(StorageRequest::SetMeta {
                key: key.into(),
                value,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(Failure::storage(e)),
        }
    }

    /// The registry, loaded from storage on first use, with every stream
    /// change since taken in.
    async fn registry(&self) -> Result<tokio::sync::MutexGuard<'_, Registry>> {
        let mut registry = self.registry.lock().await;
        if !registry.loaded {
            self.load(&mut registry).await?;
        }
        Ok(registry)
    }

    async fn load(&self, registry: &mut Registry) -> Result<()> {
        self.signer().await?;
        let entries = match self
            .call(StorageRequest::ListMeta {
                prefix: RECORDS.into(),
            })
            .await
        {
            Ok(StorageResponse::Meta(entries)) => entries,
            Ok(_) => Vec::new(),
            Err(e) => return Err(Failure::storage(e)),
        };
        let mut streams = None;
        for (key, value) in entries {
            let mut record: Record = match serde_json::from_slice(&value) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(%key, error = %e, "unreadable subscription record skipped");
                    continue;
                }
            };
            record.recover();
            for (path, link) in record.links.iter_mut() {
                link.tail = self.tail(path).await?.unwrap_or(link.tail);
            }
            let pattern = record.spec.matcher();
            if let Some(pattern) = &pattern {
                // A matching stream written to just before a crash may not
                // have been linked: link it now, its data pending.
                if streams.is_none() {
                    streams = Some(self.list().await?);
                }
                for listed in streams.iter().flatten() {
                    record.observe(Some(pattern), &listed.path, listed.tail);
                }
            }
            registry
                .subs
                .insert(record.id.clone(), Entry { record, pattern });
        }
        registry.loaded = true;
        tracing::debug!(subscriptions = registry.subs.len(), "subscriptions loaded");
        self.refilter(registry);
        Ok(())
    }

    /// Every live stream, with its tail.
    async fn list(&self) -> Result<Vec<Listed>> {
        let request = StorageRequest::List {
            prefix: String::new(),
        };
        match self.call(request).await {
            Ok(StorageResponse::Streams(streams)) => Ok(streams),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(Failure::storage(e)),
        }
    }

    /// A stream's current tail, or `None` if it does not exist.
    async fn tail(&self, path: &str) -> Result<Option<Offset>> {
        match self.call(StorageRequest::Head { path: path.into() }).await {
            Ok(StorageResponse::Head(info)) => Ok(Some(info.tail)),
            Ok(_) => Ok(None),
            Err(e) if not_found(&*e) => Ok(None),
            Err(e) => Err(Failure::storage(e)),
        }
    }

    fn refilter(&self, registry: &Registry) {
        let mut filter = Filter {
            loaded: true,
            ..Filter::default()
        };
        for entry in registry.subs.values() {
            filter.patterns.extend(entry.pattern.clone());
            filter.paths.extend(entry.record.links.keys().cloned());
        }
        *self.filter.write().unwrap_or_else(PoisonError::into_inner) = filter;
    }

    /// Takes in stream changes; returns the subscriptions whose stored
    /// state changed.
    fn absorb(&self, registry: &mut Registry) -> BTreeSet<String> {
        let touched =
            std::mem::take(&mut *self.touched.lock().unwrap_or_else(PoisonError::into_inner));
        let mut changed = BTreeSet::new();
        for touch in touched {
            for (id, entry) in registry.subs.iter_mut() {
                let stored = match &touch {
                    Touch::Tail(path, tail) => {
                        entry.record.observe(entry.pattern.as_ref(), path, *tail)
                    }
                    Touch::Deleted(path) => entry.record.forget(path),
                };
                if stored {
                    changed.insert(id.clone());
                }
            }
        }
        if !changed.is_empty() {
            self.refilter(registry);
        }
        changed
    }

    /// Moves every subscription forward to now and persists what changed.
    /// Returns the jobs to run and when to look again.
    async fn tick(
        &self,
        registry: &mut Registry,
        mut changed: BTreeSet<String>,
    ) -> Result<(Vec<Job>, Option<u64>)> {
        changed.extend(self.absorb(registry));
        let now = unix_ms(SystemTime::now());
        let signer = self.signer().await?;
        let mut jobs = Vec::new();
        for (id, entry) in registry.subs.iter_mut() {
            if let Some(action) = entry.record.step(now) {
                changed.insert(id.clone());
                jobs.push(job(&entry.record, action, &signer, now));
            }
        }
        for id in &changed {
            match registry.subs.get(id) {
                Some(entry) => self.save(&entry.record).await?,
                None => self.set_meta(&format!("{RECORDS}{id}"), None).await?,
            }
        }
        let deadline = registry
            .subs
            .values()
            .filter_map(|e| e.record.deadline())
            .min();
        Ok((jobs, deadline))
    }

    async fn save(&self, record: &Record) -> Result<()> {
        let value = serde_json::to_vec(record).expect("a record serializes");
        self.set_meta(&format!("{RECORDS}{}", record.id), Some(value.into()))
            .await
    }

    fn run_jobs(self: &Arc<Self>, jobs: Vec<Job>) {
        for job in jobs {
            let manager = Arc::downgrade(self);
            tokio::spawn(async move {
                let Some(this) = manager.upgrade() else {
                    return;
                };
                match job {
                    Job::Deliver {
                        id,
                        generation,
                        wake_id,
                        url,
                        body,
                    } => {
                        this.deliver(id, generation, wake_id, url, body).await;
                    }
                    Job::WakeEvent { stream, event } => this.write_wake_event(stream, event).await,
                }
            });
        }
    }

    async fn deliver(
        self: Arc<Self>,
        id: String,
        generation: u64,
        wake_id: String,
        url: String,
        body: Bytes,
    ) {
        let Ok(signer) = self.signer().await else {
            return;
        };
        let signature = signer.webhook_signature(unix_ms(SystemTime::now()) / 1000, &body);
        let answer = self.sender.deliver(&url, body, signature).await;
        let Ok(mut registry) = self.registry().await else {
            return;
        };
        let Some(entry) = registry.subs.get_mut(&id) else {
            return;
        };
        if entry.record.fence(generation, &wake_id).is_err() {
            return;
        }
        match answer {
            Ok(Answer::Done) => entry.record.done(),
            Ok(Answer::Accepted) => entry.record.retry = None,
            Err(why) => {
                tracing::warn!(subscription = %id, generation, %why, "webhook delivery failed");
                entry
                    .record
                    .delivery_failed(unix_ms(SystemTime::now()), jitter());
            }
        }
        let changed = BTreeSet::from([id]);
        self.finish(registry, changed).await.ok();
    }

    async fn write_wake_event(&self, stream: String, event: Bytes) {
        let content_type = ContentType::parse("application/json").expect("a valid content type");
        let records = rules::records(&content_type, event, false);
        let append = Append {
            path: stream.clone(),
            content_type: Some(content_type),
            records,
            close: false,
            stream_seq: None,
            producer: None,
            now: SystemTime::now(),
        };
        if let Err(e) = self.call(StorageRequest::Append(append)).await {
            tracing::warn!(wake_stream = %stream, error = %e, "could not write a wake event");
        }
    }

    /// Steps, persists, releases the lock and runs the jobs.
    async fn finish(
        self: &Arc<Self>,
        mut registry: tokio::sync::MutexGuard<'_, Registry>,
        changed: BTreeSet<String>,
    ) -> Result<()> {
        let (jobs, _) = self.tick(&mut registry, changed).await?;
        drop(registry);
        self.run_jobs(jobs);
        // A claim, heartbeat or new wake may have moved the next deadline:
        // the worker recomputes it.
        self.kick.notify_one();
        Ok(())
    }

    // ===== Control requests =====

    pub(crate) async fn create(
        self: &Arc<Self>,
        id: &str,
        spec: Spec,
        root: String,
    ) -> Result<(bool, Value)> {
        if let Some(url) = &spec.webhook_url {
            self.policy.check(url).map_err(Failure::webhook_url)?;
        }
        let mut registry = self.registry().await?;
        let signer = self.signer().await?;
        if let Some(entry) = registry.subs.get(id) {
            if entry.record.hash != spec.hash() {
                return Err(Failure::new(
                    http::StatusCode::CONFLICT,
                    "SUBSCRIPTION_ALREADY_EXISTS",
                    "a subscription with this id exists with a different configuration",
                ));
            }
            return Ok((false, render(&entry.record, &signer)));
        }
        let mut links = BTreeMap::new();
        let pattern = spec.matcher();
        if let Some(pattern) = &pattern {
            for listed in self.list().await? {
                if pattern.matches(&listed.path) {
                    links.insert(listed.path, Link::at(listed.tail, false));
                }
            }
        }
        for path in &spec.streams {
            let tail = self.tail(path).await?.unwrap_or(Offset::ZERO);
            let link = links
                .entry(path.clone())
                .or_insert_with(|| Link::at(tail, true));
            link.explicit = true;
        }
        let record = Record {
            id: id.to_owned(),
            hash: spec.hash(),
            spec,
            created_at: super::rfc3339(SystemTime::now()),
            root: self.public_root.clone().unwrap_or(root),
            links,
            generation: 0,
            wake: None,
            retry: None,
        };
        let body = render(&record, &signer);
        registry
            .subs
            .insert(id.to_owned(), Entry { record, pattern });
        self.refilter(&registry);
        self.finish(registry, BTreeSet::from([id.to_owned()]))
            .await?;
        Ok((true, body))
    }

    pub(crate) async fn get(&self, id: &str) -> Result<Value> {
        let registry = self.registry().await?;
        let signer = self.signer().await?;
        let entry = registry.subs.get(id).ok_or_else(Failure::not_found)?;
        Ok(render(&entry.record, &signer))
    }

    pub(crate) async fn delete(&self, id: &str) -> Result<()> {
        let mut registry = self.registry().await?;
        registry.subs.remove(id).ok_or_else(Failure::not_found)?;
        self.refilter(&registry);
        self.set_meta(&format!("{RECORDS}{id}"), None).await
    }

    pub(crate) async fn add_streams(self: &Arc<Self>, id: &str, paths: Vec<String>) -> Result<()> {
        let mut registry = self.registry().await?;
        if !registry.subs.contains_key(id) {
            return Err(Failure::not_found());
        }
        let mut tails = Vec::with_capacity(paths.len());
        for path in &paths {
            tails.push(self.tail(path).await?.unwrap_or(Offset::ZERO));
        }
        let entry = registry.subs.get_mut(id).ok_or_else(Failure::not_found)?;
        for (path, tail) in paths.into_iter().zip(tails) {
            entry
                .record
                .links
                .entry(path)
                .or_insert_with(|| Link::at(tail, true))
                .explicit = true;
        }
        self.refilter(&registry);
        self.finish(registry, BTreeSet::from([id.to_owned()])).await
    }

    pub(crate) async fn remove_stream(self: &Arc<Self>, id: &str, path: &str) -> Result<()> {
        let mut registry = self.registry().await?;
        let entry = registry.subs.get_mut(id).ok_or_else(Failure::not_found)?;
        let glob = entry.pattern.as_ref().is_some_and(|p| p.matches(path));
        if let Some(link) = entry.record.links.get_mut(path) {
            link.explicit = false;
            link.glob = glob;
            if !glob {
                entry.record.links.remove(path);
            }
        }
        self.refilter(&registry);
        self.finish(registry, BTreeSet::from([id.to_owned()])).await
    }

    pub(crate) async fn claim(self: &Arc<Self>, id: &str, worker: &str) -> Result<Value> {
        let mut registry = self.registry().await?;
        let signer = self.signer().await?;
        let changed = self.absorb(&mut registry);
        let entry = registry.subs.get_mut(id).ok_or_else(Failure::not_found)?;
        let now = unix_ms(SystemTime::now());
        let claimed = entry.record.claim(worker, now).cloned();
        let mut changed = changed;
        changed.insert(id.to_owned());
        let wake = match claimed {
            Ok(wake) => wake,
            Err(failure) => {
                // What the claim's step changed is kept even so.
                self.finish(registry, changed).await?;
                return Err(failure);
            }
        };
        let generation = entry.record.generation;
        let token = signer.token(&Claims {
            sub: id.to_owned(),
            gen: generation,
            wake: wake.id.clone(),
            exp: now + TOKEN_TTL_MS,
        });
        let body = json!({
            "wake_id": wake.id,
            "generation": generation,
            "token": token,
            "streams": wake_streams(&entry.record, &wake.tails),
            "lease_ttl_ms": entry.record.spec.lease_ttl_ms,
        });
        self.finish(registry, changed).await?;
        Ok(body)
    }

    /// A callback or ack: acks, and with `done` the end of the wake.
    pub(crate) async fn ack(
        self: &Arc<Self>,
        id: &str,
        token: Option<&str>,
        request: AckRequest,
    ) -> Result<bool> {
        let mut registry = self.registry().await?;
        let signer = self.signer().await?;
        let changed = self.absorb(&mut registry);
        let entry = registry.subs.get_mut(id).ok_or_else(Failure::not_found)?;
        authorize(&signer, token, id, &entry.record)?;
        entry.record.fence(request.generation, &request.wake_id)?;
        let next = entry
            .record
            .ack(&request.acks, request.done, unix_ms(SystemTime::now()))?;
        let mut changed = changed;
        changed.insert(id.to_owned());
        self.finish(registry, changed).await?;
        Ok(request.done && next)
    }

    pub(crate) async fn release(
        self: &Arc<Self>,
        id: &str,
        token: Option<&str>,
        generation: u64,
        wake_id: &str,
    ) -> Result<()> {
        let mut registry = self.registry().await?;
        let signer = self.signer().await?;
        let changed = self.absorb(&mut registry);
        let entry = registry.subs.get_mut(id).ok_or_else(Failure::not_found)?;
        authorize(&signer, token, id, &entry.record)?;
        entry.record.fence(generation, wake_id)?;
        entry.record.wake = None;
        let mut changed = changed;
        changed.insert(id.to_owned());
        self.finish(registry, changed).await
    }
}

/// A parsed callback or ack body.
pub(crate) struct AckRequest {
    pub(crate) wake_id: String,
    pub(crate) generation: u64,
    pub(crate) acks: Vec<(String, Offset)>,
    pub(crate) done: bool,
}

/// Checks the bearer token: signed by this server, for this subscription,
/// and for its current wake.
fn authorize(signer: &Signer, token: Option<&str>, id: &str, record: &Record) -> Result<()> {
    let token = token.ok_or_else(|| {
        Failure::new(
            http::StatusCode::UNAUTHORIZED,
            "TOKEN_INVALID",
            "a bearer token is required",
        )
    })?;
    let claims = signer
        .verify(token, unix_ms(SystemTime::now()))
        .filter(|claims| claims.sub == id)
        .ok_or_else(|| {
            Failure::new(
                http::StatusCode::UNAUTHORIZED,
                "TOKEN_INVALID",
                "invalid or expired token",
            )
        })?;
    record.fence(claims.gen, &claims.wake)
}

/// The background worker: wakes on stream changes and at deadlines.
async fn run<S>(manager: Weak<Manager<S>>, kick: Arc<Notify>)
where
    S: Service<StorageRequest, Response = StorageResponse> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    loop {
        let wait = {
            let Some(manager) = manager.upgrade() else {
                return;
            };
            let wait = match manager.registry().await {
                Ok(mut registry) => match manager.tick(&mut registry, BTreeSet::new()).await {
                    Ok((jobs, deadline)) => {
                        drop(registry);
                        manager.run_jobs(jobs);
                        deadline.map_or(IDLE, |at| {
                            Duration::from_millis(at.saturating_sub(unix_ms(SystemTime::now())))
                        })
                    }
                    Err(e) => {
                        tracing::error!(error = %e.message, "subscription worker failed; retrying");
                        Duration::from_secs(1)
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e.message, "could not load subscriptions; retrying");
                    Duration::from_secs(1)
                }
            };
            wait
        };
        tokio::select! {
            () = kick.notified() => {}
            () = tokio::time::sleep(wait.min(IDLE)) => {}
        }
    }
}

fn job(record: &Record, action: Action, signer: &Signer, now: u64) -> Job {
    match action {
        Action::Deliver {
            generation,
            wake_id,
        } => {
            let tails = record
                .wake
                .as_ref()
                .map(|w| w.tails.clone())
                .unwrap_or_default();
            let token = signer.token(&Claims {
                sub: record.id.clone(),
                gen: generation,
                wake: wake_id.clone(),
                exp: now + TOKEN_TTL_MS,
            });
            let body = json!({
                "subscription_id": record.id,
                "wake_id": wake_id,
                "generation": generation,
                "streams": wake_streams(record, &tails),
                "callback_url": format!("{}/__ds/subscriptions/{}/callback", record.root, record.id),
                "callback_token": token,
            });
            Job::Deliver {
                id: record.id.clone(),
                generation,
                wake_id,
                url: record.spec.webhook_url.clone().unwrap_or_default(),
                body: serde_json::to_vec(&body).expect("json serializes").into(),
            }
        }
        Action::WakeEvent { generation, stream } => {
            let event = json!({
                "type": "wake",
                "subscription_id": record.id,
                "stream": stream,
                "generation": generation,
                "ts": now,
            });
            Job::WakeEvent {
                stream: record.spec.wake_stream.clone().unwrap_or_default(),
                event: serde_json::to_vec(&event).expect("json serializes").into(),
            }
        }
    }
}

/// The streams of a wake, with the tails it covers.
fn wake_streams(record: &Record, tails: &BTreeMap<String, Offset>) -> Value {
    Value::Array(
        record
            .links
            .iter()
            .map(|(path, link)| {
                let tail = tails.get(path).copied().unwrap_or(link.tail);
                json!({
                    "path": path,
                    "link_type": link.link_type(),
                    "acked_offset": link.acked,
                    "tail_offset": tail,
                    "has_pending": tail > link.acked,
                })
            })
            .collect(),
    )
}

/// A subscription as `GET` shows it.
fn render(record: &Record, signer: &Signer) -> Value {
    let spec = &record.spec;
    let webhook = spec.webhook_url.as_ref().map(|url| {
        json!({
            "url": url,
            "signing": {
                "alg": "ed25519",
                "kid": signer.kid(),
                "jwks_url": format!("{}/__ds/jwks.json", record.root),
            }
        })
    });
    let streams: Vec<Value> = record
        .links
        .iter()
        .map(|(path, link)| {
            json!({
                "path": path,
                "link_type": link.link_type(),
                "acked_offset": link.acked,
            })
        })
        .collect();
    let mut body = json!({
        "id": record.id,
        "subscription_id": record.id,
        "type": match spec.kind { Kind::Webhook => "webhook", Kind::PullWake => "pull-wake" },
        "pattern": spec.pattern,
        "streams": streams,
        "webhook": webhook,
        "wake_stream": spec.wake_stream,
        "lease_ttl_ms": spec.lease_ttl_ms,
        "created_at": record.created_at,
        "status": if record.failed() { "failed" } else { "active" },
        "description": spec.description,
        "generation": record.generation,
    });
    if let Some(retry) = record.retry {
        body["next_attempt_at"] = json!(super::rfc3339(
            std::time::UNIX_EPOCH + Duration::from_millis(retry.next_attempt_at)
        ));
    }
    body
}

fn not_found(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<crate::storage::StreamError>()
        .is_some_and(|e| matches!(e.kind(), StreamErrorKind::NotFound | StreamErrorKind::Gone))
}

/// A number from 0.0 to 1.0 for retry jitter.
fn jitter() -> f64 {
    let mut bytes = [0; 4];
    let _ = getrandom::fill(&mut bytes);
    f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
}

/// Parses the stream paths and offsets of an ack list.
pub(crate) fn parse_acks(acks: Vec<super::state::Ack>) -> Result<Vec<(String, Offset)>> {
    acks.into_iter()
        .map(|ack| {
            let path = stream_path(&ack.stream)?;
            let offset = ack
                .offset
                .parse()
                .map_err(|_| Failure::invalid(format!("invalid offset {:?}", ack.offset)))?;
            Ok((path, offset))
        })
        .collect()
}
