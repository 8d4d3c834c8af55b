//! The host side of the ABI: [`PluginApi`] (a checked copy of a descriptor) and
//! [`PluginStore`], the [`KVStoreBase`] that calls a plugin's functions.

use std::ffi::CStr;
use std::fmt;
use std::sync::Arc;

use super::abi::*;
use super::{
    capabilities_from_mask, capability_code, check_transferable, dtype_code, dtype_from_code,
    host_bytes, host_bytes_mut, key_to_abi, standardised,
};
use crate::{
    Capability, CreateRequest, DType, Error, KVStoreBase, Key, KeyedOuts, KeyedValues, NDArray,
    OptimizerSpec, Result,
};

/// Bytes of the message buffer the host passes with every call.
const MESSAGE_CAP: usize = 2048;
/// The longest store type name the host reads from a plugin, in bytes.
const MAX_TYPE_NAME: usize = 64 * 1024;

/// The functions and facts of a plugin, copied from its descriptor and checked: the ABI
/// version, the descriptor's size, the name and every required function.
#[derive(Clone)]
pub struct PluginApi {
    name: String,
    origin: String,
    capabilities: Option<Vec<Capability>>,
    create: KvCreateFn,
    destroy: KvDestroyFn,
    type_name: KvTypeNameFn,
    rank: KvCountFn,
    num_workers: KvCountFn,
    is_capable: KvIsCapableFn,
    init: Option<KvInitFn>,
    push: Option<KvPushFn>,
    pull: Option<KvPushFn>,
    pushpull: KvPushPullFn,
    broadcast: KvPushPullFn,
    set_optimizer: Option<KvSetOptimizerFn>,
}

impl fmt::Debug for PluginApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginApi")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

/// The capabilities a plugin store can have through ABI version 1.
fn forwardable(capability: Capability, has_set_optimizer: bool) -> bool {
    match capability {
        Capability::InitPushPull | Capability::Distributed => true,
        Capability::Optimizer => has_set_optimizer,
        _ => false,
    }
}

impl PluginApi {
    /// Checks and copies a descriptor; `origin` (a library path) names it in messages.
    ///
    /// # Safety
    /// `descriptor` must be null or point to a descriptor of at least its `struct_size` bytes
    /// whose name and functions stay valid for the rest of the program (a library that is
    /// never unloaded) and follow the ABI.
    ///
    /// # Errors
    /// [`Error::Plugin`] for a null descriptor, another ABI version, a descriptor smaller than
    /// version 1's, a missing or non-UTF-8 name, or a missing required function.
    pub unsafe fn from_descriptor(
        descriptor: *const KvPluginDescriptor,
        origin: &str,
    ) -> Result<PluginApi> {
        let fail = |reason: String| Error::Plugin {
            path: origin.into(),
            reason,
        };
        if descriptor.is_null() {
            return Err(fail(format!(
                "{KV_PLUGIN_ENTRY}() returned a null descriptor"
            )));
        }
        // SAFETY: the caller guarantees a readable descriptor; its first two fields exist in
        // every version, and the whole version-1 struct is read only after `struct_size`
        // says it is there.
        let (version, size) = unsafe { ((*descriptor).abi_version, (*descriptor).struct_size) };
        if version != KV_PLUGIN_ABI_VERSION {
            return Err(fail(format!(
                "the plugin was built for kvstore plugin ABI version {version}, but this host \
                 speaks version {KV_PLUGIN_ABI_VERSION}; rebuild it against this kvstore"
            )));
        }
        if size < std::mem::size_of::<KvPluginDescriptor>() {
            return Err(fail(format!(
                "its descriptor is {size} bytes, smaller than the {} bytes of ABI version \
                 {KV_PLUGIN_ABI_VERSION}",
                std::mem::size_of::<KvPluginDescriptor>()
            )));
        }
        // SAFETY: the descriptor holds at least a full version-1 struct (checked above).
        let d = unsafe { std::ptr::read(descriptor) };
        if d.name.is_null() {
            return Err(fail("its descriptor has no name".into()));
        }
        // SAFETY: the caller guarantees that a non-null name is a valid C string.
        let name = unsafe { CStr::from_ptr(d.name) }
            .to_str()
            .map_err(|_| fail("its name is not UTF-8".into()))?
            .trim()
            .to_lowercase();
        if name.is_empty() {
            return Err(fail("its name is empty".into()));
        }
        let need = |present: bool, function: &str| {
            if present {
                Ok(())
            } else {
                Err(fail(format!(
                    "its descriptor lacks the required function `{function}`"
                )))
            }
        };
        need(d.create.is_some(), "create")?;
        need(d.destroy.is_some(), "destroy")?;
        need(d.type_name.is_some(), "type_name")?;
        need(d.rank.is_some(), "rank")?;
        need(d.num_workers.is_some(), "num_workers")?;
        need(d.is_capable.is_some(), "is_capable")?;
        need(d.pushpull.is_some(), "pushpull")?;
        need(d.broadcast.is_some(), "broadcast")?;
        let has_set_optimizer = d.set_optimizer.is_some();
        let capabilities = (d.capabilities != KV_CAPABILITIES_UNDECLARED).then(|| {
            capabilities_from_mask(d.capabilities)
                .into_iter()
                .filter(|&c| forwardable(c, has_set_optimizer))
                .collect()
        });
        let (Some(create), Some(destroy), Some(type_name), Some(rank), Some(num_workers)) =
            (d.create, d.destroy, d.type_name, d.rank, d.num_workers)
        else {
            unreachable!("checked above")
        };
        let (Some(is_capable), Some(pushpull), Some(broadcast)) =
            (d.is_capable, d.pushpull, d.broadcast)
        else {
            unreachable!("checked above")
        };
        Ok(PluginApi {
            name,
            origin: origin.to_string(),
            capabilities,
            create,
            destroy,
            type_name,
            rank,
            num_workers,
            is_capable,
            init: d.init,
            push: d.push,
            pull: d.pull,
            pushpull,
            broadcast,
            set_optimizer: d.set_optimizer,
        })
    }

    /// The store name the plugin declares (lower-cased).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the plugin comes from (its library path).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The declared capabilities (those ABI version 1 can forward), or `None` when the plugin
    /// does not declare them.
    pub fn capabilities(&self) -> Option<&[Capability]> {
        self.capabilities.as_deref()
    }

    /// Creates a store through the plugin's `create`.
    ///
    /// # Errors
    /// Whatever the plugin's factory reports.
    pub fn create(self: &Arc<Self>, request: &CreateRequest) -> Result<PluginStore> {
        let options: Vec<KvOption> = request
            .options
            .iter()
            .map(|(k, v)| KvOption {
                key: k.as_ptr(),
                key_len: k.len(),
                value: v.as_ptr(),
                value_len: v.len(),
            })
            .collect();
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        // SAFETY: every pointer is valid for the call: the name and options borrow `request`
        // and `options`, the record and its buffer live on this stack frame.
        let handle = unsafe {
            (self.create)(
                request.name.as_ptr(),
                request.name.len(),
                options.as_ptr(),
                options.len(),
                &mut record,
            )
        };
        if handle.is_null() {
            let code = if record.code == KV_OK {
                KV_ERR_BACKEND
            } else {
                record.code
            };
            return Err(self.error(&self.name, "create", code, &record, &[], &[]));
        }
        let mut name_buffer = [0u8; 256];
        // SAFETY: `handle` is live; the buffer has the stated capacity.
        let len = unsafe { (self.type_name)(handle, name_buffer.as_mut_ptr(), name_buffer.len()) };
        let type_name = if len < name_buffer.len() {
            String::from_utf8_lossy(&name_buffer[..len]).into_owned()
        } else {
            // The length is the plugin's word: a longer name than this is cut, not allocated.
            let mut long = vec![0u8; len.min(MAX_TYPE_NAME) + 1];
            // SAFETY: as above, with a buffer large enough for the whole name.
            let len = unsafe { (self.type_name)(handle, long.as_mut_ptr(), long.len()) };
            String::from_utf8_lossy(&long[..len.min(long.len() - 1)]).into_owned()
        };
        Ok(PluginStore {
            api: Arc::clone(self),
            handle,
            type_name,
        })
    }

    /// The [`Error`] a failed call reported.
    fn error(
        &self,
        store: &str,
        operation: &'static str,
        code: i32,
        record: &KvError,
        value_keys: &[Key],
        out_keys: &[Key],
    ) -> Error {
        let len = record.message_len.min(MESSAGE_CAP.saturating_sub(1));
        let message = if record.message.is_null() {
            String::new()
        } else {
            // SAFETY: the message points into the host's buffer of MESSAGE_CAP bytes.
            let bytes = unsafe { std::slice::from_raw_parts(record.message, len) };
            String::from_utf8_lossy(bytes).into_owned()
        };
        let dtype = |c: u32| dtype_from_code(c).unwrap_or(DType::F32);
        let shape = |dims: &[i64; KV_ERROR_MAX_NDIM], n: u32| -> Vec<usize> {
            dims[..(n as usize).min(KV_ERROR_MAX_NDIM)]
                .iter()
                .map(|&d| d.max(0) as usize)
                .collect()
        };
        let cause = match code {
            KV_ERR_UNSUPPORTED => {
                return Error::Unsupported {
                    store: store.to_string(),
                    operation,
                }
            }
            KV_ERR_PANIC => {
                return Error::Panic {
                    store: store.to_string(),
                    operation,
                    message,
                }
            }
            KV_ERR_INVALID_ARGUMENT => Error::InvalidArgument(message),
            KV_ERR_SHAPE_MISMATCH => Error::ShapeMismatch {
                what: message,
                expected: shape(&record.shape_expected, record.ndim_expected),
                found: shape(&record.shape_found, record.ndim_found),
            },
            KV_ERR_DTYPE_MISMATCH
                if dtype_from_code(record.dtype_expected).is_some()
                    && dtype_from_code(record.dtype_found).is_some() =>
            {
                Error::DTypeMismatch {
                    what: message,
                    expected: dtype(record.dtype_expected),
                    found: dtype(record.dtype_found),
                }
            }
            KV_ERR_KEY_NOT_INITIALIZED => Error::KeyNotInitialized,
            KV_ERR_DUPLICATE_INIT => Error::DuplicateInit,
            KV_ERR_COUNT_MISMATCH => Error::CountMismatch {
                operation,
                what: message,
                expected: record.count_expected,
                found: record.count_found,
            },
            KV_ERR_DEVICE => Error::Device(message),
            KV_ERR_BACKEND => Error::Backend {
                store: store.to_string(),
                source: message.into(),
            },
            other => Error::Backend {
                store: store.to_string(),
                source: format!("plugin {} returned status {other}: {message}", self.origin).into(),
            },
        };
        let key = match record.key_source {
            KV_ERROR_KEY_OF_VALUES => value_keys.get(record.key_index),
            KV_ERROR_KEY_OF_OUTS => out_keys.get(record.key_index),
            _ => None,
        };
        match key {
            Some(key) => cause.at_key(store, operation, key.clone()),
            None => cause,
        }
    }
}

/// A store living in a plugin, reached through the C ABI.
///
/// Inputs are passed as pointers into the caller's arrays (copied first only when an array
/// is not in standard layout); outputs are written by the plugin straight into the caller's
/// arrays. Row-sparse and GPU arrays cannot cross ABI version 1 and are an
/// [`Error::InvalidArgument`]; a `pull` with `ignore_sparse` skips row-sparse outputs, as in
/// MXNet. Operations the ABI does not carry are [`Error::Unsupported`].
pub struct PluginStore {
    api: Arc<PluginApi>,
    handle: KvStoreHandle,
    type_name: String,
}

// SAFETY: the ABI requires plugin stores to be usable from any thread, concurrently; the
// handle is only ever passed to the plugin's functions.
unsafe impl Send for PluginStore {}
// SAFETY: as for `Send`.
unsafe impl Sync for PluginStore {}

impl fmt::Debug for PluginStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginStore")
            .field("type_name", &self.type_name)
            .field("plugin", &self.api.origin)
            .finish()
    }
}

impl Drop for PluginStore {
    fn drop(&mut self) {
        // SAFETY: the handle came from the plugin's `create` and is released exactly once.
        unsafe { (self.api.destroy)(self.handle) };
    }
}

/// Arrays laid out for a call: keys, shapes and tensors pointing into the arrays (or into
/// standard-layout copies kept here).
struct Marshalled {
    keys: Vec<KvKey>,
    tensors: Vec<KvTensor>,
    _shapes: Vec<Vec<i64>>,
    /// Standard-layout copies of outputs that were not contiguous, by position; copied back
    /// after a successful call.
    staged: Vec<(usize, NDArray)>,
    _input_copies: Vec<NDArray>,
}

fn tensor_for(data: *mut u8, byte_len: usize, array: &NDArray, shape: &[i64]) -> KvTensor {
    KvTensor {
        data,
        byte_len,
        dtype: dtype_code(array.dtype()),
        ndim: shape.len() as u32,
        shape: shape.as_ptr(),
        device_type: KV_DEVICE_CPU,
        device_id: 0,
    }
}

fn shape_of(array: &NDArray) -> Vec<i64> {
    array.shape().iter().map(|&d| d as i64).collect()
}

fn marshal_values(keys: &[Key], values: &[&NDArray]) -> Result<Marshalled> {
    for (i, v) in values.iter().enumerate() {
        check_transferable(v, &format!("value {i}"))?;
    }
    let copies: Vec<NDArray> = values
        .iter()
        .filter(|v| v.dense().and_then(host_bytes).is_none())
        .map(|v| standardised(v))
        .collect();
    let shapes: Vec<Vec<i64>> = values.iter().map(|v| shape_of(v)).collect();
    let mut next_copy = copies.iter();
    let tensors = values
        .iter()
        .zip(&shapes)
        .map(|(v, shape)| {
            let bytes = match v.dense().and_then(host_bytes) {
                Some(b) => b,
                None => next_copy
                    .next()
                    .and_then(|c| c.dense())
                    .and_then(host_bytes)
                    .expect("one standard-layout copy per non-contiguous value"),
            };
            // Inputs are read-only by the ABI's contract; the pointer is `*mut` only because
            // one tensor type serves inputs and outputs.
            tensor_for(bytes.as_ptr().cast_mut(), bytes.len(), v, shape)
        })
        .collect();
    Ok(Marshalled {
        keys: keys.iter().map(key_to_abi).collect(),
        tensors,
        _shapes: shapes,
        staged: Vec::new(),
        _input_copies: copies,
    })
}

fn marshal_outs(keys: &[Key], outs: &mut [&mut NDArray], skip: &[bool]) -> Result<Marshalled> {
    for (i, o) in outs.iter().enumerate() {
        if !skip[i] {
            check_transferable(o, &format!("output {i}"))?;
        }
    }
    let mut m = Marshalled {
        keys: Vec::new(),
        tensors: Vec::new(),
        _shapes: Vec::new(),
        staged: Vec::new(),
        _input_copies: Vec::new(),
    };
    for (i, out) in outs.iter_mut().enumerate() {
        if skip[i] {
            continue;
        }
        if out.dense().and_then(host_bytes).is_none() {
            m.staged.push((i, standardised(out)));
        }
    }
    let mut staged = m.staged.iter_mut();
    for (i, out) in outs.iter_mut().enumerate() {
        if skip[i] {
            continue;
        }
        let shape = shape_of(out);
        let dtype = out.dtype();
        let target: &mut NDArray = if out.dense().and_then(host_bytes).is_some() {
            out
        } else {
            &mut staged
                .next()
                .expect("one staged copy per non-contiguous output")
                .1
        };
        let bytes = target
            .dense_mut()
            .and_then(host_bytes_mut)
            .expect("contiguous or staged");
        let mut tensor = tensor_for(bytes.as_mut_ptr(), bytes.len(), target, &shape);
        tensor.dtype = dtype_code(dtype);
        m.keys.push(key_to_abi(&keys[i]));
        m.tensors.push(tensor);
        m._shapes.push(shape);
    }
    // The shape vectors moved into `_shapes` keep their heap buffers, so the pointers stay valid.
    Ok(m)
}

impl PluginStore {
    /// The plugin this store lives in.
    pub fn api(&self) -> &PluginApi {
        &self.api
    }

    fn fail(
        &self,
        operation: &'static str,
        code: i32,
        record: &KvError,
        value_keys: &[Key],
        out_keys: &[Key],
    ) -> Error {
        self.api.error(
            &self.type_name,
            operation,
            code,
            record,
            value_keys,
            out_keys,
        )
    }

    fn finish_outs(outs: &mut KeyedOuts<'_>, staged: Vec<(usize, NDArray)>) -> Result<()> {
        for (i, copy) in staged {
            outs.outs_mut()[i].assign(&copy)?;
        }
        Ok(())
    }

    fn values_into_outs(
        &self,
        operation: &'static str,
        function: KvPushPullFn,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        outs.check_against(operation, values)?;
        let inputs = marshal_values(values.keys(), values.values())?;
        let out_keys = outs.keys().to_vec();
        let skip = vec![false; outs.len()];
        let outputs = marshal_outs(&out_keys, outs.outs_mut(), &skip)?;
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        // SAFETY: the handle is live; keys and tensors point into arrays borrowed for the
        // call (inputs read-only, outputs exclusively borrowed through `outs`); the record
        // and its buffer live on this stack frame.
        let code = unsafe {
            function(
                self.handle,
                inputs.keys.as_ptr(),
                inputs.tensors.as_ptr(),
                inputs.tensors.len(),
                outputs.keys.as_ptr(),
                outputs.tensors.as_ptr(),
                outputs.tensors.len(),
                priority,
                &mut record,
            )
        };
        if code != KV_OK {
            return Err(self.fail(operation, code, &record, values.keys(), &out_keys));
        }
        Self::finish_outs(outs, outputs.staged)
    }

    /// Calls an inputs-only plugin function (`init`, `push`) with `values` marshalled, and turns
    /// its status into a `Result`.
    fn with_values(
        &self,
        operation: &'static str,
        values: &KeyedValues<'_>,
        call: impl FnOnce(KvStoreHandle, *const KvKey, *const KvTensor, usize, &mut KvError) -> i32,
    ) -> Result<()> {
        let m = marshal_values(values.keys(), values.values())?;
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        // The keys and tensors point into arrays borrowed for the call (read-only); the record
        // and its buffer live on this stack frame.
        let code = call(
            self.handle,
            m.keys.as_ptr(),
            m.tensors.as_ptr(),
            m.tensors.len(),
            &mut record,
        );
        if code != KV_OK {
            return Err(self.fail(operation, code, &record, values.keys(), &[]));
        }
        Ok(())
    }
}

impl KVStoreBase for PluginStore {
    fn type_name(&self) -> &str {
        &self.type_name
    }

    fn rank(&self) -> usize {
        // SAFETY: the handle is live.
        unsafe { (self.api.rank)(self.handle) as usize }
    }

    fn num_workers(&self) -> usize {
        // SAFETY: the handle is live.
        unsafe { (self.api.num_workers)(self.handle) as usize }
    }

    fn is_capable(&self, capability: Capability) -> bool {
        if !forwardable(capability, self.api.set_optimizer.is_some()) {
            return false;
        }
        // SAFETY: the handle is live.
        unsafe { (self.api.is_capable)(self.handle, capability_code(capability)) != 0 }
    }

    fn broadcast_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.values_into_outs("broadcast", self.api.broadcast, values, outs, priority)
    }

    fn pushpull_batch(
        &self,
        values: &KeyedValues<'_>,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
    ) -> Result<()> {
        self.values_into_outs("pushpull", self.api.pushpull, values, outs, priority)
    }

    fn init_batch(&self, values: &KeyedValues<'_>) -> Result<()> {
        let Some(init) = self.api.init else {
            return Err(self.unsupported("init"));
        };
        // SAFETY: `with_values` passes arrays of `n` marshalled entries and a live record.
        self.with_values("init", values, |handle, keys, tensors, n, record| unsafe {
            init(handle, keys, tensors, n, record)
        })
    }

    fn push_batch(&self, values: &KeyedValues<'_>, priority: i32) -> Result<()> {
        let Some(push) = self.api.push else {
            return Err(self.unsupported("push"));
        };
        // SAFETY: `with_values` passes arrays of `n` marshalled entries and a live record.
        self.with_values("push", values, |handle, keys, tensors, n, record| unsafe {
            push(handle, keys, tensors, n, priority, record)
        })
    }

    fn pull_batch(
        &self,
        outs: &mut KeyedOuts<'_>,
        priority: i32,
        ignore_sparse: bool,
    ) -> Result<()> {
        let Some(pull) = self.api.pull else {
            return Err(self.unsupported("pull"));
        };
        let skip: Vec<bool> = outs
            .outs()
            .iter()
            .map(|o| ignore_sparse && o.dense().is_none())
            .collect();
        let keys = outs.keys().to_vec();
        let m = marshal_outs(&keys, outs.outs_mut(), &skip)?;
        if m.tensors.is_empty() {
            return Ok(());
        }
        // Error key indices refer to the pulled outputs only.
        let pulled: Vec<Key> = keys
            .iter()
            .zip(&skip)
            .filter(|(_, &s)| !s)
            .map(|(k, _)| k.clone())
            .collect();
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        // SAFETY: as in `values_into_outs`, with outputs only.
        let code = unsafe {
            pull(
                self.handle,
                m.keys.as_ptr(),
                m.tensors.as_ptr(),
                m.tensors.len(),
                priority,
                &mut record,
            )
        };
        if code != KV_OK {
            return Err(self.fail("pull", code, &record, &pulled, &[]));
        }
        Self::finish_outs(outs, m.staged)
    }

    fn set_optimizer(&self, optimizer: &OptimizerSpec) -> Result<()> {
        let Some(set_optimizer) = self.api.set_optimizer else {
            return Err(self.unsupported("set_optimizer"));
        };
        let json = serde_json::to_vec(optimizer).map_err(|e| Error::Backend {
            store: self.type_name.clone(),
            source: Box::new(e),
        })?;
        let mut buffer = [0u8; MESSAGE_CAP];
        let mut record = KvError::with_buffer(&mut buffer);
        // SAFETY: the handle is live; the JSON and the record live for the call.
        let code = unsafe { set_optimizer(self.handle, json.as_ptr(), json.len(), &mut record) };
        if code != KV_OK {
            return Err(self.fail("set_optimizer", code, &record, &[], &[]));
        }
        Ok(())
    }
}

/// Registers the plugin `api` describes in the runtime registry under its name, so that
/// [`create`](crate::create) builds its stores; returns the origin of a registration it
/// overrides (a warning is logged then, as MXNet does).
pub fn register_descriptor(api: PluginApi) -> Option<String> {
    let api = Arc::new(api);
    let factory_api = Arc::clone(&api);
    crate::register_runtime(
        &api.name,
        &api.origin,
        api.capabilities.as_deref(),
        move |request| Ok(Box::new(factory_api.create(request)?) as Box<dyn KVStoreBase>),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::export::{create_store, ExportedPlugin};

    #[derive(Debug)]
    struct Named;

    impl KVStoreBase for Named {
        fn type_name(&self) -> &str {
            "named"
        }
        fn rank(&self) -> usize {
            0
        }
        fn num_workers(&self) -> usize {
            1
        }
        fn is_capable(&self, _: Capability) -> bool {
            false
        }
        fn broadcast_batch(
            &self,
            _: &KeyedValues<'_>,
            _: &mut KeyedOuts<'_>,
            _: i32,
        ) -> Result<()> {
            Ok(())
        }
        fn pushpull_batch(&self, _: &KeyedValues<'_>, _: &mut KeyedOuts<'_>, _: i32) -> Result<()> {
            Ok(())
        }
    }

    unsafe extern "C" fn create(
        name: *const u8,
        name_len: usize,
        options: *const KvOption,
        n_options: usize,
        err: *mut KvError,
    ) -> KvStoreHandle {
        // SAFETY: the host's arguments are forwarded unchanged.
        unsafe {
            create_store(
                |_| Ok(Box::new(Named) as Box<dyn KVStoreBase>),
                name,
                name_len,
                options,
                n_options,
                err,
            )
        }
    }

    /// A broken plugin: claims a name of `usize::MAX` bytes, writes nothing.
    unsafe extern "C" fn lying_type_name(_: KvStoreHandle, _: *mut u8, _: usize) -> usize {
        usize::MAX
    }

    #[test]
    fn an_absurd_type_name_length_is_not_trusted() {
        let exported = ExportedPlugin::new("named", None, create);
        // SAFETY: `descriptor()` points to a live, complete descriptor.
        let mut descriptor = unsafe { *exported.descriptor() };
        descriptor.type_name = Some(lying_type_name);
        // SAFETY: the copy's name and functions live as long as `exported` and follow the ABI
        // (but for the type name's length, which is what is tested).
        let api = Arc::new(unsafe { PluginApi::from_descriptor(&descriptor, "test") }.unwrap());
        let request = CreateRequest {
            name: "named".into(),
            ..CreateRequest::default()
        };
        let store = api.create(&request).unwrap();
        assert!(store.type_name().len() <= MAX_TYPE_NAME);
    }
}
