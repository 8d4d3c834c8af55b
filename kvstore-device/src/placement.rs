//! MXNet's merge-buffer placement (`CommDevice::InitMergeBuffer`): keys are taken by size,
//! largest first, and each goes to the device with the least data placed so far.

/// Places `keys` (`(id, element count)`, ids opaque) on `devices`, continuing from the
/// running `totals` (elements per device, same order as `devices`, updated). Returns the
/// device of each key, in the order of `keys`.
///
/// Keys are sorted by size, descending (a stable sort: equal sizes keep their order); each
/// takes the device with the smallest total, the first such in `devices` order on a tie
/// (MXNet leaves ties to an unordered map's iteration order).
///
/// ```
/// use kvstore_device::placement::place;
/// let mut totals = vec![0, 0];
/// // sizes 10, 30, 20: 30 -> dev 0, 20 -> dev 1, 10 -> dev 1
/// assert_eq!(place(&[10, 30, 20], &[0, 1], &mut totals), vec![1, 0, 1]);
/// assert_eq!(totals, vec![30, 30]);
/// ```
///
/// # Panics
/// When `devices` is empty or `totals` has another length.
pub fn place(sizes: &[usize], devices: &[usize], totals: &mut [usize]) -> Vec<usize> {
    assert!(!devices.is_empty(), "at least one device");
    assert_eq!(devices.len(), totals.len(), "one total per device");
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]));
    let mut out = vec![devices[0]; sizes.len()];
    for i in order {
        let (slot, _) = totals
            .iter()
            .enumerate()
            .min_by_key(|&(j, t)| (*t, j))
            .expect("non-empty");
        totals[slot] += sizes[i];
        out[i] = devices[slot];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::place;

    #[test]
    fn balances_bytes_across_devices() {
        let mut totals = vec![0; 4];
        let sizes = [100, 100, 100, 100, 50, 50, 50, 50];
        let devs = place(&sizes, &[0, 1, 2, 3], &mut totals);
        assert_eq!(devs, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(totals, vec![150; 4]);
    }

    #[test]
    fn continues_from_earlier_totals() {
        let mut totals = vec![500, 0];
        assert_eq!(place(&[10, 10], &[3, 5], &mut totals), vec![5, 5]);
    }

    #[test]
    fn one_device_takes_everything() {
        let mut totals = vec![0];
        assert_eq!(place(&[1, 2, 3], &[2], &mut totals), vec![2, 2, 2]);
        assert_eq!(totals, vec![6]);
    }
}
