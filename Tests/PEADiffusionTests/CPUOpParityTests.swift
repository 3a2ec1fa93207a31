import CKernels
import XCTest
@testable import PEADiffusion

/// Every CPU op against torch, on the fixtures of tools/reference/make_op_fixtures.py (docs/testing.md tolerances).
final class CPUOpParityTests: XCTestCase {
    /// The fixtures the op registry asks for (its rows' `torchFixtures`); each needs at least one case, so a new
    /// op cannot go untested.
    static let requiredOps = Set(Op.allCases.flatMap(\.info.torchFixtures))

    /// With one and two threads, and with convolutions unrolled a band of one output row at a time (the band
    /// limit set to one float) as well as whole, as large images are.
    func testEveryOpMatchesTorch() throws {
        let fixtures = try OpFixture.all()
        XCTAssertEqual(Self.requiredOps.subtracting(fixtures.map(\.op)), [], "ops without a torch fixture")
        defer { ck_set_num_threads(0); ck_conv2d_set_band_floats(0) }
        for (threads, band) in [(1, 0), (2, 0), (2, 1)] as [(Int, Int64)] {
            ck_conv2d_set_band_floats(band)
            let backend = CPUBackend(threads: threads)
            for fixture in fixtures {
                let outputs = try fixture.run(on: backend)
                XCTAssertEqual(Set(outputs.keys), Set(fixture.outputs.keys), "\(fixture.name): output names")
                for (key, expected) in fixture.outputs {
                    guard let actual = outputs[key] else { continue }
                    let what = "\(fixture.name) out.\(key) (\(threads) threads\(band > 0 ? ", one-row bands" : ""))"
                    XCTAssertEqual(actual.shape, expected.shape, "\(what): shape")
                    if expected.dtype == .f32 {
                        assertClose(actual.floats(), expected.floats(), .f32, what)
                    } else {
                        // storage conversions must round exactly as torch does
                        XCTAssertEqual(actual.dtype, expected.dtype, "\(what): dtype")
                        XCTAssertEqual(actual.bytes, expected.bytes, "\(what): bytes")
                    }
                }
            }
        }
    }
}
