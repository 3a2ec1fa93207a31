import CKernels
import XCTest

/// The pool must cover every index exactly once, for any n, grain and thread count, and stay correct when
/// called again and again (the generation hand-off between jobs is where pools go wrong).
final class ThreadPoolTests: XCTestCase {
    /// Raw memory, so that two pool threads writing disjoint indices do not trip Swift's exclusivity checks.
    private final class Counts {
        let hits: UnsafeMutablePointer<Int32>
        let n: Int
        init(_ n: Int) {
            self.n = n
            hits = .allocate(capacity: n)
            hits.initialize(repeating: 0, count: n)
        }
        deinit { hits.deallocate() }
        var array: [Int32] { Array(UnsafeBufferPointer(start: hits, count: n)) }
    }

    func testEveryIndexVisitedOnce() {
        let saved = ck_get_num_threads()
        defer { ck_set_num_threads(saved) }
        for threads: Int32 in [1, 2, 3, 8] {
            ck_set_num_threads(threads)
            for n in [1, 2, 7, 64, 1000] {
                for grain: Int64 in [1, 3, 100] {
                    for _ in 0..<20 {
                        let counts = Counts(n)
                        let context = Unmanaged.passUnretained(counts).toOpaque()
                        ck_parallel_for(Int64(n), grain, { ctx, begin, end in
                            let counts = Unmanaged<Counts>.fromOpaque(ctx!).takeUnretainedValue()
                            for i in Int(begin)..<Int(end) { counts.hits[i] += 1 }
                        }, context)
                        XCTAssertEqual(counts.array, [Int32](repeating: 1, count: n), "threads \(threads) n \(n) grain \(grain)")
                    }
                }
            }
        }
    }
}
