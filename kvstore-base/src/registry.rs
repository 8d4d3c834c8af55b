//! The store registry: static registrations collected by `inventory`, a runtime registry
//! over them, and [`create`].
//!
//! A backend crate registers its stores with [`register!`](crate::register); linking the crate
//! is enough for [`create`] to find them by name. Stores registered at run time (plugins,
//! tests) take precedence, and overriding a name logs a warning, as MXNet does.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use crate::{Capability, Error, KVStoreBase, Result};

/// What a factory receives: the name the store was requested by (lower-cased, possibly an
/// alias) and options (`key = value` strings from a config file or the caller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    /// The requested name, lower-cased.
    pub name: String,
    /// Options for the store.
    pub options: BTreeMap<String, String>,
}

/// Builds a store from a request.
pub type StoreFactory = fn(&CreateRequest) -> Result<Box<dyn KVStoreBase>>;

/// A static registration, submitted by [`register!`](crate::register).
#[derive(Debug)]
pub struct Registration {
    /// The name (a type name or path for `register!(Type)`; compared case-insensitively).
    pub name: &'static str,
    /// Other names for the same store (e.g. MXNet's `local_allreduce_cpu` for `local`).
    pub aliases: &'static [&'static str],
    /// Builds the store.
    pub factory: StoreFactory,
    /// The capabilities, when declared; otherwise they are found by building a store.
    pub capabilities: Option<&'static [Capability]>,
    /// The module that registered the store.
    pub origin: &'static str,
}

inventory::collect!(Registration);

impl Registration {
    /// The registered name: the last path segment, lower-cased (`my::MyKVStore` -> `mykvstore`).
    pub fn store_name(&self) -> String {
        normalise(self.name)
    }

    fn answers_to(&self, lower: &str) -> bool {
        self.store_name() == lower || self.aliases.iter().any(|a| normalise(a) == lower)
    }
}

pub(crate) fn normalise(name: &str) -> String {
    name.rsplit("::")
        .next()
        .unwrap_or(name)
        .trim()
        .to_lowercase()
}

type DynFactory = Arc<dyn Fn(&CreateRequest) -> Result<Box<dyn KVStoreBase>> + Send + Sync>;

#[derive(Clone)]
struct RuntimeEntry {
    factory: DynFactory,
    capabilities: Option<Vec<Capability>>,
    origin: String,
}

fn runtime() -> &'static RwLock<BTreeMap<String, RuntimeEntry>> {
    static RUNTIME: OnceLock<RwLock<BTreeMap<String, RuntimeEntry>>> = OnceLock::new();
    RUNTIME.get_or_init(Default::default)
}

/// Loads the plugins of `KVSTORE_PLUGIN_PATH` the first time the registry is consulted or
/// changed.
fn discover_plugins() {
    #[cfg(feature = "dynamic-plugins")]
    crate::plugin::discover_once();
}

fn statics() -> impl Iterator<Item = &'static Registration> {
    inventory::iter::<Registration>.into_iter()
}

/// Registers a store at run time under `name` (case-insensitive).
///
/// `origin` says where it comes from (a crate, a plugin path); `capabilities` declares what
/// it offers, or `None` to find out by building one. If the name is already taken (at run
/// time or statically) the new store wins and a warning is logged, MXNet's
/// `New kvstore ... is overriding existing kvstore ...`; the overridden origin is returned.
/// The plugins of `KVSTORE_PLUGIN_PATH` are loaded first, if they were not yet: they never
/// override a store registered here.
///
/// ```
/// use kvstore_base::{register_runtime, create, KVStoreBase};
/// # #[derive(Debug)] struct Mine;
/// # impl KVStoreBase for Mine {
/// #   fn type_name(&self) -> &str { "mine" }
/// #   fn rank(&self) -> usize { 0 }
/// #   fn num_workers(&self) -> usize { 1 }
/// #   fn is_capable(&self, _: kvstore_base::Capability) -> bool { false }
/// #   fn broadcast_batch(&self, _: &kvstore_base::KeyedValues<'_>, _: &mut kvstore_base::KeyedOuts<'_>, _: i32) -> kvstore_base::Result<()> { Ok(()) }
/// #   fn pushpull_batch(&self, _: &kvstore_base::KeyedValues<'_>, _: &mut kvstore_base::KeyedOuts<'_>, _: i32) -> kvstore_base::Result<()> { Ok(()) }
/// # }
/// register_runtime("Mine", "my_crate", Some(&[]), |_| Ok(Box::new(Mine)));
/// assert_eq!(create("MINE").unwrap().type_name(), "mine");
/// ```
pub fn register_runtime<F>(
    name: &str,
    origin: &str,
    capabilities: Option<&[Capability]>,
    factory: F,
) -> Option<String>
where
    F: Fn(&CreateRequest) -> Result<Box<dyn KVStoreBase>> + Send + Sync + 'static,
{
    // The environment's plugins first, so that they cannot override this one later.
    discover_plugins();
    let lower = normalise(name);
    let entry = RuntimeEntry {
        factory: Arc::new(factory),
        capabilities: capabilities.map(<[Capability]>::to_vec),
        origin: origin.to_string(),
    };
    let mut table = runtime().write().unwrap_or_else(PoisonError::into_inner);
    let previous = table
        .insert(lower.clone(), entry)
        .map(|old| old.origin)
        .or_else(|| {
            statics()
                .find(|r| r.answers_to(&lower))
                .map(|r| r.origin.to_string())
        });
    if let Some(old) = &previous {
        log::warn!(
            "WARNING: New kvstore {origin}::{lower} is overriding existing kvstore {old}::{lower}"
        );
    }
    previous
}

/// Removes a runtime registration; static registrations of the name become visible again.
/// Returns whether there was one.
pub fn unregister_runtime(name: &str) -> bool {
    discover_plugins();
    let mut table = runtime().write().unwrap_or_else(PoisonError::into_inner);
    table.remove(&normalise(name)).is_some()
}

/// Creates the store registered as `name` (case-insensitive, as MXNet's `create`).
///
/// The registry's first use (`create`, [`create_with`], [`registered`], [`registered_names`],
/// [`register_runtime`], `load_plugin`) also loads the plugins listed in `KVSTORE_PLUGIN_PATH` (with the `dynamic-plugins` feature; see
/// [`plugin`](crate::plugin)); a plugin that fails to load is logged and skipped.
///
/// Unlike MXNet, an unknown name is an error (MXNet silently falls back to a local store):
/// the error lists every registered name and suggests the nearest one.
///
/// ```
/// # kvstore_base::register_runtime("my_sum", "doc", Some(&[]), |_| Err(kvstore_base::Error::InvalidArgument("doc".into())));
/// let err = kvstore_base::create("my_sun").unwrap_err();
/// assert!(err.to_string().contains("did you mean \"my_sum\"?"));
/// ```
///
/// # Errors
/// [`Error::UnknownStore`], [`Error::AmbiguousStore`] when two crates registered the name
/// statically, or whatever the store's factory returns.
pub fn create(name: &str) -> Result<Box<dyn KVStoreBase>> {
    create_with(name, BTreeMap::new())
}

/// Creates the default store, `local` (MXNet's `create()` with no name).
///
/// # Errors
/// [`Error::UnknownStore`] when no crate registering `local` is linked.
pub fn create_default() -> Result<Box<dyn KVStoreBase>> {
    create("local")
}

/// [`create`] with options for the store.
///
/// # Errors
/// As [`create`].
pub fn create_with(name: &str, options: BTreeMap<String, String>) -> Result<Box<dyn KVStoreBase>> {
    discover_plugins();
    let lower = normalise(name);
    let request = CreateRequest {
        name: lower.clone(),
        options,
    };
    let runtime_entry = runtime()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&lower)
        .cloned();
    if let Some(entry) = runtime_entry {
        return (entry.factory)(&request);
    }
    let found: Vec<&Registration> = statics().filter(|r| r.answers_to(&lower)).collect();
    match found.as_slice() {
        [one] => (one.factory)(&request),
        [] => {
            let registered = registered_names();
            let provided_by = provider_of(&lower);
            Err(Error::UnknownStore {
                suggestion: provided_by
                    .is_none()
                    .then(|| nearest(&lower, &registered))
                    .flatten(),
                provided_by,
                name: lower,
                registered,
            })
        }
        many => Err(Error::AmbiguousStore {
            name: lower,
            origins: many.iter().map(|r| r.origin.to_string()).collect(),
        }),
    }
}

/// A registered store, as listed by [`registered`].
#[derive(Debug, Clone)]
pub struct StoreInfo {
    /// The name `create` takes.
    pub name: String,
    /// Other names for it.
    pub aliases: Vec<String>,
    /// Its capabilities, or why they could not be found (building it failed).
    pub capabilities: std::result::Result<Vec<Capability>, String>,
    /// Where it comes from.
    pub origin: String,
    /// Whether it was registered at run time.
    pub runtime: bool,
}

/// Every registered store with its capabilities, sorted by name. A runtime registration
/// hides a static one of the same name.
pub fn registered() -> Vec<StoreInfo> {
    discover_plugins();
    let table = runtime()
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut infos: Vec<StoreInfo> = statics()
        .filter(|r| !table.contains_key(&r.store_name()))
        .map(|r| StoreInfo {
            name: r.store_name(),
            aliases: r.aliases.iter().map(|a| normalise(a)).collect(),
            capabilities: match r.capabilities {
                Some(caps) => Ok(caps.to_vec()),
                None => probe(|request| (r.factory)(request), &r.store_name()),
            },
            origin: r.origin.to_string(),
            runtime: false,
        })
        .collect();
    infos.extend(table.into_iter().map(|(name, entry)| StoreInfo {
        capabilities: match entry.capabilities {
            Some(caps) => Ok(caps),
            None => probe(|request| (entry.factory)(request), &name),
        },
        name,
        aliases: Vec::new(),
        origin: entry.origin,
        runtime: true,
    }));
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    infos
}

/// Every name and alias `create` accepts, sorted and deduplicated.
pub fn registered_names() -> Vec<String> {
    discover_plugins();
    let mut names: Vec<String> = statics()
        .flat_map(|r| std::iter::once(r.store_name()).chain(r.aliases.iter().map(|a| normalise(a))))
        .chain(
            runtime()
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .cloned(),
        )
        .collect();
    names.sort();
    names.dedup();
    names
}

fn probe(
    factory: impl Fn(&CreateRequest) -> Result<Box<dyn KVStoreBase>>,
    name: &str,
) -> std::result::Result<Vec<Capability>, String> {
    let request = CreateRequest {
        name: name.to_string(),
        options: BTreeMap::new(),
    };
    let store = factory(&request).map_err(|e| e.to_string())?;
    Ok(Capability::ALL
        .iter()
        .copied()
        .filter(|&c| store.is_capable(c))
        .collect())
}

/// The names (and aliases) this project's backend crates register, with their crate and the
/// `kvstore` facade's feature that links it: MXNet's names a program may ask for without
/// linking the backend.
const PROVIDERS: &[(&[&str], &str, &str)] = &[
    (
        &["local", "local_update_cpu", "local_allreduce_cpu"],
        "kvstore-local",
        "local",
    ),
    (
        &["device", "local_allreduce_device", "nccl"],
        "kvstore-device",
        "device",
    ),
    (
        &[
            "dist_sync",
            "dist",
            "dist_device_sync",
            "dist_sync_device",
            "dist_async",
            "dist_async_device",
            "dist_device_async",
        ],
        "kvstore-dist",
        "dist",
    ),
    (&["byteps"], "kvstore-byteps", "byteps"),
    (&["horovod"], "kvstore-horovod", "horovod"),
    (
        &["pslite_dist_sync", "pslite_dist_async"],
        "kvstore-pslite",
        "pslite",
    ),
    (&["teststore"], "kvstore-test", "test"),
];

/// Which of this project's crates registers `name` (lower-cased), as the text of
/// [`Error::UnknownStore`]'s `provided_by`.
fn provider_of(name: &str) -> Option<String> {
    PROVIDERS
        .iter()
        .find(|(names, _, _)| names.contains(&name))
        .map(|(_, krate, feature)| {
            format!("the crate {krate} (the `kvstore` crate's feature {feature:?})")
        })
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a likely typo
/// (or one name contains the other).
fn nearest(name: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| {
            *d <= (name.chars().count() / 3).max(2)
                || (!name.is_empty() && (c.contains(name) || name.contains(c.as_str())))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Registers a store type so that [`create`] finds it by name.
///
/// - `register!(MyKVStore)`: the name is the type name lower-cased (`mykvstore`), as MXNet's
///   `KVStoreBase.register` decorator does; the type must implement `Default`, which builds it.
///   `register!(MyKVStore, capabilities = [...])` declares its capabilities, so listing them
///   does not build a store.
/// - `register!("name", factory)`: an explicit name and a [`StoreFactory`], optionally followed
///   by `aliases = ["other_name", ...]` and `capabilities = [Capability::Optimizer, ...]`
///   (without them, capabilities are found by building a store).
///
/// The registration lives in the crate that calls the macro and takes effect when that crate
/// is linked into the program (a crate nobody names is not linked: `use my_store as _;`).
///
/// ```
/// use kvstore_base::{register, create, KVStoreBase, Capability, KeyedValues, KeyedOuts, Result};
///
/// #[derive(Debug, Default)]
/// struct MyKVStore;
///
/// impl KVStoreBase for MyKVStore {
///     fn type_name(&self) -> &str { "mykvstore" }
///     fn rank(&self) -> usize { 0 }
///     fn num_workers(&self) -> usize { 1 }
///     fn is_capable(&self, _: Capability) -> bool { false }
///     fn broadcast_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> { Ok(()) }
///     fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> { Ok(()) }
/// }
///
/// register!(MyKVStore);
///
/// assert_eq!(create("MyKVStore").unwrap().type_name(), "mykvstore");
/// ```
#[macro_export]
macro_rules! register {
    (@caps) => {
        ::core::option::Option::None
    };
    (@caps [$($cap:expr),*]) => {
        ::core::option::Option::Some(&[$($cap),*])
    };
    ($name:literal, $factory:expr
        $(, aliases = [$($alias:literal),* $(,)?])?
        $(, capabilities = [$($cap:expr),* $(,)?])? $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::Registration {
                name: $name,
                aliases: &[$($($alias),*)?],
                factory: $factory,
                capabilities: $crate::register!(@caps $([$($cap),*])?),
                origin: ::core::module_path!(),
            }
        }
    };
    ($($ty:ident)::+ $(, capabilities = [$($cap:expr),* $(,)?])? $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::Registration {
                name: ::core::stringify!($($ty)::+),
                aliases: &[],
                factory: |_: &$crate::CreateRequest| {
                    ::core::result::Result::Ok(::std::boxed::Box::new(
                        <$($ty)::+ as ::core::default::Default>::default(),
                    ) as ::std::boxed::Box<dyn $crate::KVStoreBase>)
                },
                capabilities: $crate::register!(@caps $([$($cap),*])?),
                origin: ::core::module_path!(),
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("local", "locl"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("dist_sync", "dist_async"), 1);
    }

    #[test]
    fn an_unlinked_backends_name_says_which_crate_provides_it() {
        let e = create("nccl").unwrap_err();
        assert!(
            e.to_string().ends_with(
                "; \"nccl\" is a store of the crate kvstore-device (the `kvstore` crate's \
                 feature \"device\"), which this program does not link"
            ),
            "{e}"
        );
        let e = create("Dist_Async_Device").unwrap_err();
        assert!(e.to_string().contains("kvstore-dist"), "{e}");
        let e = create("no_such_store").unwrap_err();
        assert!(!e.to_string().contains("does not link"), "{e}");
    }

    #[test]
    fn nearest_suggests_close_names_only() {
        let names = vec!["local".to_string(), "teststore".to_string()];
        assert_eq!(nearest("locla", &names).as_deref(), Some("local"));
        assert_eq!(nearest("test", &names).as_deref(), Some("teststore"));
        assert_eq!(nearest("zzzzzzzzzz", &names), None);
    }

    #[test]
    fn names_are_last_segment_lower_case() {
        assert_eq!(normalise("my_crate :: MyKVStore"), "mykvstore");
        assert_eq!(normalise("Dist_Sync"), "dist_sync");
    }
}
