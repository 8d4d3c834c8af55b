//! The compression kernels ([`COMPRESSION_KERNELS`]) against [`kvstore_compression::Codec`].

use std::path::Path;

use kvstore_compression::{Codec, CompressionType};
use kvstore_device::gpu_codec::COMPRESSION_KERNELS;
use libtest_mimic::{Failed, Trial};

use crate::emulator::{self, f32s, grid_args, run, same, Rng, SPECIAL_VALUES};

/// The driver: quantises and dequantises rounds of gradients with the kernels.
const DRIVER: &str = r#"
// kind (2|1) n threshold-bits(hex) blocks threads offset rounds
// stdin: rounds x grad[n], then base[n]; stdout per round: residual[n], words, deq[n], base+deq[n]
int main(int argc, char** argv) {
    if (argc != 8) { fprintf(stderr, "usage\n"); return 2; }
    int kind = atoi(argv[1]);
    unsigned long long n = strtoull(argv[2], 0, 10);
    uint32_t tb = (uint32_t)strtoul(argv[3], 0, 16);
    float t; memcpy(&t, &tb, 4);
    unsigned blocks = (unsigned)atoi(argv[4]), threads = (unsigned)atoi(argv[5]);
    unsigned offset = (unsigned)atoi(argv[6]);
    int rounds = atoi(argv[7]);
    unsigned long long factor = kind == 2 ? 16 : 32;
    unsigned long long words = (n + factor - 1) / factor;
    std::vector<float> gbuf(n + 8), rbuf(n + 8, 0.0f), dbuf(n + 8), abuf(n + 8), base(n);
    float* g = gbuf.data() + offset; float* r = rbuf.data() + offset;
    float* d = dbuf.data() + offset; float* a = abuf.data() + offset;
    std::vector<unsigned int> packed(words + 1);
    std::vector<float> grads(n * rounds);
    get(grads.data(), 4 * n * rounds);
    get(base.data(), 4 * n);
    for (int k = 0; k < rounds; ++k) {
        memcpy(g, grads.data() + k * n, 4 * n);
        for (unsigned long long w = 0; w <= words; ++w) packed[w] = 0xdeadbeefu;
        if (kind == 2) launch(blocks, threads, [&] { quantize_2bit(g, r, packed.data(), t, n); });
        else launch(blocks, threads, [&] { quantize_1bit(g, r, packed.data(), t, n); });
        if (packed[words] != 0xdeadbeefu) { fprintf(stderr, "wrote past the words\n"); return 3; }
        memcpy(a, base.data(), 4 * n);
        if (kind == 2) {
            launch(blocks, threads, [&] { dequantize_2bit(packed.data(), d, t, 0, n); });
            launch(blocks, threads, [&] { dequantize_2bit(packed.data(), a, t, 1, n); });
        } else {
            launch(blocks, threads, [&] { dequantize_1bit(packed.data(), d, 0, n); });
            launch(blocks, threads, [&] { dequantize_1bit(packed.data(), a, 1, n); });
        }
        put(r, 4 * n); put(packed.data(), 4 * words); put(d, 4 * n); put(a, 4 * n);
    }
    fflush(stdout);
    return 0;
}
"#;

const ROUNDS: usize = 4;
const LENGTHS: &[usize] = &[1, 5, 15, 16, 17, 31, 32, 33, 47, 64, 100, 1000];

/// Gradients of round `k`: mostly `scale * [-1.5, 1.5)`, with special values mixed in.
fn gradient(rng: &mut Rng, n: usize, t: f32, k: usize) -> Vec<f32> {
    let scale = if t.abs() > 0.0 { t.abs() } else { 1.0 };
    let near_t = [
        t,
        -t,
        f32::from_bits(t.to_bits().wrapping_sub(1)),
        f32::from_bits(t.to_bits().wrapping_add(1)),
        1.0,
        -1.0,
    ];
    let specials: Vec<f32> = near_t.into_iter().chain(SPECIAL_VALUES).collect();
    (0..n)
        .map(|i| {
            if (i * 7 + k * 3).is_multiple_of(11) {
                specials[(i + k) % specials.len()]
            } else {
                rng.next() * 1.5 * scale
            }
        })
        .collect()
}

/// Runs the codec kernels on several lengths, grids and alignments, several rounds each, and
/// compares every output with the CPU codec's.
fn emulate(exe: &Path, codec: Codec) -> Result<(), Failed> {
    let kind = match codec.kind() {
        CompressionType::TwoBit => 2,
        CompressionType::OneBit => 1,
    };
    let t = codec.threshold();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ u64::from(t.to_bits()) ^ kind);
    let mut checked = 0;
    for (c, &n) in LENGTHS.iter().enumerate() {
        for offset in [0usize, 1] {
            let [blocks, threads] = grid_args(c + offset);
            let grads: Vec<Vec<f32>> = (0..ROUNDS).map(|k| gradient(&mut rng, n, t, k)).collect();
            let base: Vec<f32> = (0..n).map(|_| rng.next() * 3.0).collect();
            let mut input = Vec::with_capacity(4 * n * (ROUNDS + 1));
            for v in grads.iter().chain(std::iter::once(&base)) {
                input.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
            let args = [
                kind.to_string(),
                n.to_string(),
                format!("{:08x}", t.to_bits()),
                blocks.to_string(),
                threads.to_string(),
                offset.to_string(),
                ROUNDS.to_string(),
            ];
            let stdout = run(exe, &args, &input)?;
            let packed_len = codec.compressed_len(n);
            let round_len = 4 * n * 3 + packed_len;
            if stdout.len() != round_len * ROUNDS {
                return Err(format!("emulator wrote {} bytes", stdout.len()).into());
            }
            let mut residual = vec![0.0f32; n];
            let mut packed = vec![0u8; packed_len];
            for (k, round) in stdout.chunks_exact(round_len).enumerate() {
                let what = format!("{} t={t} n={n} offset={offset} round {k}", codec.kind());
                codec.quantize(&grads[k], &mut residual, &mut packed)?;
                let (r, rest) = round.split_at(4 * n);
                let (p, rest) = rest.split_at(packed_len);
                let (d, a) = rest.split_at(4 * n);
                if let Some(i) = same(&f32s(r), &residual) {
                    return Err(format!(
                        "{what}: residual {i}: kernel {:?} vs codec {:?}",
                        f32s(r)[i],
                        residual[i]
                    )
                    .into());
                }
                if p != packed.as_slice() {
                    return Err(format!("{what}: packed {p:02x?} vs codec {packed:02x?}").into());
                }
                let mut deq = vec![0.0f32; n];
                codec.dequantize(&packed, &mut deq)?;
                if let Some(i) = same(&f32s(d), &deq) {
                    return Err(format!("{what}: dequantised element {i} differs").into());
                }
                let mut added = base.clone();
                codec.dequantize_add(&packed, &mut added)?;
                if let Some(i) = same(&f32s(a), &added) {
                    return Err(format!("{what}: dequantise-add element {i} differs").into());
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, LENGTHS.len() * 2 * ROUNDS);
    Ok(())
}

/// One check per codec setting, all sharing one build of the emulator.
pub fn trials() -> Vec<Trial> {
    let emulator = emulator::build("codec", COMPRESSION_KERNELS, DRIVER);
    let codecs = [
        Codec::two_bit(0.5),
        Codec::two_bit(0.1),
        Codec::two_bit(1e-6),
        Codec::two_bit(3.0),
        Codec::one_bit(-0.5),
        Codec::one_bit(0.0),
        Codec::one_bit(0.5),
    ];
    codecs
        .into_iter()
        .map(|codec| {
            let name = format!(
                "emulated::{}_t{}_matches_the_cpu_codec",
                codec.kind(),
                codec.threshold()
            );
            crate::emulated_trial(name, &emulator, move |exe| emulate(exe, codec))
        })
        .collect()
}
