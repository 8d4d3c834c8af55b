mod common;
use std::time::Duration;
use kvstore_base::{DType, KVStoreExt, NDArray};
use kvstore_pslite as _;

#[test]
fn smoke() {
    let mut job = common::MxnetJob::start(1, 2, &[("PS_VERBOSE", "2")]).unwrap();
    job.python_worker("pyworker", r#"
kv = mx.kv.create('dist_sync')
print("python rank", kv.rank, flush=True)
kv.init(3, mx.nd.ones((2,3)))
kv.push(3, mx.nd.ones((2,3))*(kv.rank+1))
out = mx.nd.zeros((2,3)); kv.pull(3, out=out); print(out.asnumpy(), flush=True)
"#).unwrap();
    let kv = kvstore_base::create_with("pslite_dist_sync", job.worker_options()).unwrap();
    eprintln!("rust rank {}", kv.rank());
    kv.init(3, &NDArray::ones(&[2, 3], DType::F32)).unwrap();
    let g = NDArray::full(&[2, 3], (kv.rank() + 1) as f64, DType::F32);
    kv.push(3, &g).unwrap();
    let mut out = NDArray::zeros(&[2, 3], DType::F32);
    kv.pull(3, &mut out).unwrap();
    eprintln!("rust got {:?}", out);
    drop(kv);
    let r = job.wait(Duration::from_secs(30));
    for f in std::fs::read_dir(job.dir()).unwrap() { let p = f.unwrap().path(); eprintln!("== {}\n{}", p.display(), std::fs::read_to_string(&p).unwrap_or_default()); }
    r.unwrap();
}
