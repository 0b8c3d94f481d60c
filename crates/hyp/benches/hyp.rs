//! Benchmarks of the hypervisor core on the fake platform: pool
//! allocation, ownership transitions and hypercall dispatch.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pkvm_arch::pte::{S2Features, S2Prot};
use pkvm_arch::{Gfn, PAGE_SIZE};
use pkvm_hyp::hvc::{id, HVC_REGS};
use pkvm_hyp::{Hyp, HypConfig, HypPool, MemRegion, VmConfig};
#[allow(unused_imports)]
use pkvm_hyp::{HypPlatform, MemMap, PageMeta};

#[path = "../src/testutil.rs"]
#[allow(dead_code)]
mod testutil;

use testutil::{FakePlatform, FAKE_BASE};

const PAGES: u64 = 2048;

fn pool(c: &mut Criterion) {
    let plat = FakePlatform::new(PAGES as usize);
    let pool = HypPool::new(&plat, plat.memmap(), FAKE_BASE, PAGES, 0).unwrap();
    c.bench_function("pool order-0 alloc+free", |b| {
        b.iter(|| {
            let p = pool.alloc(0).unwrap();
            pool.put(&plat, black_box(p));
        })
    });
    c.bench_function("pool order-9 alloc+free (zeroes 2 MiB)", |b| {
        b.iter(|| {
            let p = pool.alloc(9).unwrap();
            pool.put(&plat, black_box(p));
        })
    });
}

fn hyp() -> Hyp<FakePlatform> {
    let plat = FakePlatform::new(PAGES as usize);
    let regions = [MemRegion {
        base: FAKE_BASE,
        size: PAGES * PAGE_SIZE,
    }];
    let cfg = HypConfig {
        mem: plat.memmap(),
        regions: &regions,
        host_rx: &[],
        pool_base: FAKE_BASE + (PAGES - 256) * PAGE_SIZE,
        pool_pages: 256,
        pool_reserved: 0,
        host_ipa_bits: 40,
        features: S2Features::default(),
    };
    Hyp::new(plat, &cfg).unwrap()
}

fn transitions(c: &mut Criterion) {
    let h = hyp();
    let pfn = |i: u64| (FAKE_BASE + i * PAGE_SIZE).pfn();
    let handle = h.reserve_vm().unwrap() as u64;
    let cfg = VmConfig {
        ipa_bits: 40,
        nr_vcpus: 1,
        protected: false,
    };
    h.init_vm(handle, pfn(2), pfn(0), cfg).unwrap();
    h.init_vcpu(handle, 0, pfn(3)).unwrap();
    h.topup_memcache(handle, pfn(4), 4).unwrap();
    h.vcpu_load(0, handle, 0).unwrap();
    c.bench_function("host_share_guest + host_unshare_guest", |b| {
        b.iter(|| {
            h.host_share_guest(0, pfn(100), Gfn(5), S2Prot::RW).unwrap();
            h.host_unshare_guest(handle, Gfn(5)).unwrap();
        })
    });
    c.bench_function("host_share_hyp + host_unshare_hyp", |b| {
        b.iter(|| {
            h.host_share_hyp(pfn(101)).unwrap();
            h.host_unshare_hyp(pfn(101)).unwrap();
        })
    });
}

fn dispatch(c: &mut Criterion) {
    let h = hyp();
    let mut regs = [0u64; HVC_REGS];
    c.bench_function("hvc decode+dispatch GET_SIZES", |b| {
        b.iter(|| {
            regs[0] = id::GET_SIZES as u64;
            regs[1] = 40;
            h.handle_host_hvc(0, black_box(&mut regs));
            assert_eq!(regs[0], 0);
        })
    });
    h.finalize();
    let pfn = (FAKE_BASE + 100 * PAGE_SIZE).pfn().0;
    c.bench_function("hvc decode+dispatch HOST_SHARE_HYP+UNSHARE_HYP", |b| {
        b.iter(|| {
            regs[0] = id::HOST_SHARE_HYP as u64;
            regs[1] = pfn;
            h.handle_host_hvc(0, black_box(&mut regs));
            regs[0] = id::HOST_UNSHARE_HYP as u64;
            regs[1] = pfn;
            h.handle_host_hvc(0, black_box(&mut regs));
            assert_eq!(regs[0], 0);
        })
    });
    c.bench_function("hvc rejected (unknown id)", |b| {
        b.iter(|| {
            regs[0] = 0xc600_0fff;
            h.handle_host_hvc(0, black_box(&mut regs));
        })
    });
}

criterion_group!(benches, pool, transitions, dispatch);
criterion_main!(benches);
