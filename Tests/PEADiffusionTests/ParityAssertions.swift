import Foundation
import XCTest
@testable import PEADiffusion

/// docs/testing.md's f32 tolerances: relative L2 error ≤ 1e-4 and max |Δ| ≤ 1e-3 · max(1, |reference|) per
/// element.
struct ParityTolerance {
    var relativeL2: Double = 1e-4
    var maxAbsolute: Double = 1e-3

    static let f32 = ParityTolerance()
}

/// Compares `actual` with `expected` (from a reference library) and reports the first failing criterion.
func assertClose(_ actual: [Float], _ expected: [Float], _ tolerance: ParityTolerance = .f32, _ what: String,
                 file: StaticString = #filePath, line: UInt = #line) {
    guard actual.count == expected.count else {
        XCTFail("\(what): \(actual.count) values, expected \(expected.count)", file: file, line: line)
        return
    }
    var diff2 = 0.0, ref2 = 0.0
    var worst = (index: -1, excess: 0.0)
    for i in 0..<actual.count {
        let a = Double(actual[i]), e = Double(expected[i])
        if a == e { if e.isFinite { ref2 += e * e }; continue }   // equal infinities are fine
        if !a.isFinite || !e.isFinite {
            XCTFail("\(what): element \(i) is \(a), expected \(e)", file: file, line: line)
            return
        }
        let d = abs(a - e)
        diff2 += d * d
        ref2 += e * e
        let allowed = tolerance.maxAbsolute * max(1, abs(e))
        if d > allowed, d - allowed > worst.excess { worst = (i, d - allowed) }
    }
    let relative = ref2 > 0 ? (diff2 / ref2).squareRoot() : diff2.squareRoot()
    if relative > tolerance.relativeL2 {
        XCTFail("\(what): relative L2 error \(relative) > \(tolerance.relativeL2)", file: file, line: line)
    }
    if worst.index >= 0 {
        let i = worst.index
        XCTFail("\(what): element \(i) is \(actual[i]), expected \(expected[i]) (|Δ| beyond \(tolerance.maxAbsolute)·max(1,|ref|))", file: file, line: line)
    }
}

/// The repository's Tests/Fixtures folder, found from this source file's path.
func fixturesDirectory() -> String {
    var path = "\(#filePath)"
    for _ in 0..<2 { path = String(path[..<path.lastIndex(of: "/")!]) }
    return path + "/Fixtures"
}

/// Generated 8-bit images against the reference's pixels [N, H, W, 3] (docs/testing.md: max |Δ| ≤ 1/255,
/// mean |Δ| ≤ 0.02/255).
func assertSameImages(_ images: [RGBImage], _ expected: HostTensor, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(images.count, expected.shape[0], "\(what): image count", file: file, line: line)
    let reference = expected.integers()!
    var worst = 0, total = 0, count = 0
    for (n, image) in images.enumerated() {
        XCTAssertEqual([image.height, image.width], Array(expected.shape[1...2]), "\(what): size", file: file, line: line)
        let offset = n * image.pixels.count
        for (i, value) in image.pixels.enumerated() where offset + i < reference.count {
            let d = abs(Int(value) - reference[offset + i])
            worst = max(worst, d)
            total += d
            count += 1
        }
    }
    XCTAssertLessThanOrEqual(worst, 1, "\(what): max |Δ| in 8-bit steps", file: file, line: line)
    XCTAssertLessThanOrEqual(Double(total) / Double(max(count, 1)), 0.02, "\(what): mean |Δ| in 8-bit steps", file: file, line: line)
}
