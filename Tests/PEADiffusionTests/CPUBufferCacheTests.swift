import XCTest
@testable import PEADiffusion

/// The CPU backend's buffer cache: a workload that repeats takes no new memory from the system after its
/// first round, and the memory the cache manages stays within a quarter above the most that was live at once.
final class CPUBufferCacheTests: XCTestCase {
    private let mb = 1 << 20

    /// One "step": allocations and frees in a fixed, interleaved order of mixed sizes, like a model's
    /// activations (some freed early, some held to the end, a large scratch buffer in the middle, later
    /// requests a little smaller than buffers freed before them).
    private func step(_ cache: CPUBufferCache) throws {
        let a = try cache.allocate(5 * mb), b = try cache.allocate(3 * mb + 4096)
        cache.release(a.0, capacity: a.1)
        let scratch = try cache.allocate(64 * mb)
        let c = try cache.allocate(9 * mb / 2)          // a's buffer serves it
        cache.release(scratch.0, capacity: scratch.1)
        let d = try cache.allocate(60 * mb), e = try cache.allocate(20 * mb)   // d takes the scratch buffer
        for buffer in [b, c, d, e] { cache.release(buffer.0, capacity: buffer.1) }
    }

    func testARepeatedWorkloadAllocatesOnlyInItsFirstRound() throws {
        let cache = CPUBufferCache(floor: 0)
        try step(cache)
        let afterFirst = cache.systemAllocations
        XCTAssertEqual(afterFirst, 4, "a, b, the scratch buffer and e; c and d reuse a's and the scratch's")
        for _ in 0..<3 { try step(cache) }
        XCTAssertEqual(cache.systemAllocations, afterFirst, "later rounds found every buffer kept")
        XCTAssertEqual(cache.liveBytes, 0)
    }

    func testManagedMemoryStaysWithinAQuarterAboveThePeakLiveSet() throws {
        let cache = CPUBufferCache(floor: 0)
        var live: [(UnsafeMutableRawPointer, Int)] = []
        // Live sets of different sizes, so kept buffers rarely fit the next request exactly.
        var random = SplitMix64(seed: 3)
        for round in 0..<40 {
            for _ in 0..<(1 + round % 5) { live.append(try cache.allocate((1 + Int(random.next() % 24)) * mb)) }
            XCTAssertLessThanOrEqual(cache.liveBytes + cache.keptBytes, cache.peakLiveBytes + cache.peakLiveBytes / 4,
                                     "round \(round): kept buffers pushed the managed memory past the peak live set")
            while live.count > round % 3 {
                let buffer = live.removeFirst()
                cache.release(buffer.0, capacity: buffer.1)
            }
        }
        for buffer in live { cache.release(buffer.0, capacity: buffer.1) }
        XCTAssertEqual(cache.liveBytes, 0)
    }

    func testAKeptBufferServesASmallerRequestOnlyWithinAQuarter() throws {
        let cache = CPUBufferCache(floor: 1 << 30)
        let big = try cache.allocate(8 * mb)
        cache.release(big.0, capacity: big.1)
        let near = try cache.allocate(7 * mb)           // 8 ≤ 7 + 7/4: the kept 8 MB buffer serves it
        XCTAssertEqual(near.0, big.0)
        XCTAssertEqual(near.1, 8 * mb)
        cache.release(near.0, capacity: near.1)
        let far = try cache.allocate(4 * mb)            // 8 > 4 + 1: a new buffer
        XCTAssertNotEqual(far.0, big.0)
        XCTAssertEqual(cache.systemAllocations, 2)
        cache.release(far.0, capacity: far.1)
    }

    func testSmallBuffersGoStraightToMalloc() throws {
        let cache = CPUBufferCache(floor: 0)
        let small = try cache.allocate(4096)
        cache.release(small.0, capacity: small.1)
        XCTAssertEqual(cache.keptBytes, 0)
        XCTAssertEqual(cache.systemAllocations, 0)
    }
}
