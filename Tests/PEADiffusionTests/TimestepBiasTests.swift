import XCTest
@testable import PEADiffusion

/// `TimestepBias` draws timesteps in proportion to diffusers' `generate_timestep_weights`: weight 1 everywhere,
/// `multiplier` on the biased slice.
final class TimestepBiasTests: XCTestCase {
    /// How often each timestep comes out over a fine, even grid of uniform draws.
    func histogram(_ bias: TimestepBias, count: Int, draws: Int) -> [Int] {
        var hits = [Int](repeating: 0, count: count)
        for i in 0..<draws { hits[bias.timestep(forUniform: (Float(i) + 0.5) / Float(draws), count: count)] += 1 }
        return hits
    }

    func testUniformIsTheOfficialFloor() {
        for u: Float in [0, 0.0004, 0.25, 0.5, 0.9999, 0.99999994] {
            XCTAssertEqual(TimestepBias().timestep(forUniform: u, count: 1000), min(Int(u * 1000), 999))
            XCTAssertEqual(TimestepBias(strategy: .later, multiplier: 1).timestep(forUniform: u, count: 1000),
                           min(Int(u * 1000), 999))
        }
    }

    func testBiasedSliceIsDrawnMultiplierTimesAsOften() {
        // count 100, portion 0.25: later → 75..<100, earlier → 0..<25, range 40..<60.
        let cases: [(TimestepBias, Range<Int>)] = [
            (TimestepBias(strategy: .later, multiplier: 4, portion: 0.25), 75..<100),
            (TimestepBias(strategy: .earlier, multiplier: 3, portion: 0.25), 0..<25),
            (TimestepBias(strategy: .range, multiplier: 2, begin: 40, end: 60), 40..<60),
            (TimestepBias(strategy: .later, multiplier: 0.5, portion: 0.5), 50..<100),
        ]
        for (bias, biased) in cases {
            let draws = 200_000
            let hits = histogram(bias, count: 100, draws: draws)
            XCTAssertEqual(hits.reduce(0, +), draws)
            let plain = hits[biased.lowerBound == 0 ? 99 : 0]
            for t in 0..<100 {
                let expected = Double(plain) * (biased.contains(t) ? bias.multiplier : 1)
                XCTAssertEqual(Double(hits[t]), expected, accuracy: 2, "\(bias.strategy) t \(t): \(hits[t]) against \(expected)")
            }
        }
    }

    /// A multiplier too large to multiply a count by still gives a distribution: the biased slice, evenly.
    func testHugeMultiplierDrawsTheBiasedSliceEvenly() {
        let hits = histogram(TimestepBias(strategy: .later, multiplier: 1e308, portion: 0.25), count: 100, draws: 100_000)
        XCTAssertEqual(hits[0..<75].reduce(0, +), 0)
        for t in 75..<100 { XCTAssertEqual(Double(hits[t]), 4000, accuracy: 2, "t \(t)") }
    }

    func testEveryDrawIsAValidTimestep() {
        let bias = TimestepBias(strategy: .range, multiplier: 10, begin: 990, end: 5000)
        for u: Float in [0, 0.5, 0.999, 0.99999994] {
            XCTAssert((0..<1000).contains(bias.timestep(forUniform: u, count: 1000)))
        }
        XCTAssertEqual(bias.timestep(forUniform: 0.99999994, count: 1000), 999)
    }
}
