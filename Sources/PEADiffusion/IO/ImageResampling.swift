#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Pillow's 8-bit `Image.resize` and `ImageFilter.GaussianBlur`, bit for bit, on interleaved 8-bit images of
/// 1 (mode "L") or 3 (mode "RGB") channels. diffusers' VaeImageProcessor resizes init images and masks with
/// `resize(..., resample=LANCZOS)` and blurs masks with `GaussianBlur`; the training transform resizes with
/// BILINEAR. Each arithmetic step is libImaging's (Resample.c, BoxBlur.c): the same doubles, floats, fixed
/// point and rounding, so the results are equal, not merely close.
public enum ImageResampling {
    /// Pillow's resampling filters that Pea uses.
    public enum Filter: Sendable {
        case bilinear, lanczos

        var support: Double { self == .bilinear ? 1 : 3 }

        func weight(_ x: Double) -> Double {
            switch self {
            case .bilinear:
                let x = abs(x)
                return x < 1 ? 1 - x : 0
            case .lanczos:   // sinc truncated to [-3, 3), windowed by a sinc 3 times wider
                return -3 <= x && x < 3 ? Self.sinc(x) * Self.sinc(x / 3) : 0
            }
        }

        private static func sinc(_ x: Double) -> Double {
            guard x != 0 else { return 1 }
            let px = x * Double.pi
            return sin(px) / px
        }
    }

    /// `image.resize((width, height), resample=filter)` of an RGB image (reducing_gap None, no box).
    public static func resize(_ image: RGBImage, width: Int, height: Int, filter: Filter) -> RGBImage {
        RGBImage(width: width, height: height,
                 pixels: resize(image.pixels, channels: 3, width: image.width, height: image.height,
                                toWidth: width, toHeight: height, filter: filter))
    }

    /// `image.filter(ImageFilter.GaussianBlur(radius))` of an RGB image.
    public static func gaussianBlur(_ image: RGBImage, radius: Float) -> RGBImage {
        RGBImage(width: image.width, height: image.height,
                 pixels: gaussianBlur(image.pixels, channels: 3, width: image.width, height: image.height, radius: radius))
    }

    // MARK: - Resample.c

    /// Interleaved `channels`-channel pixels resized as ImagingResample does: two 1-D passes, the first one's
    /// result rounded and clipped to 8 bits before the second; a pass whose size does not change is skipped,
    /// and an unchanged size is a copy. The horizontal pass goes first unless the height shrinks by more than
    /// twice as many pixels as the width does (Pillow 13: "if height is scaled down significantly more than
    /// width, resize vertically first", python-pillow/Pillow#9549; the order changes the rounding).
    static func resize(_ pixels: [UInt8], channels: Int, width: Int, height: Int,
                       toWidth: Int, toHeight: Int, filter: Filter) -> [UInt8] {
        precondition(toWidth > 0 && toHeight > 0 && width > 0 && height > 0, "resize \(width)×\(height) to \(toWidth)×\(toHeight)")
        let verticalFirst = toHeight < height && height - toHeight > 2 * (width - toWidth)
        var image = pixels
        if verticalFirst {
            image = resizeVertically(image, channels: channels, width: width, height: height, toHeight: toHeight, filter: filter)
            return resizeHorizontally(image, channels: channels, width: width, height: toHeight, toWidth: toWidth, filter: filter)
        }
        image = resizeHorizontally(image, channels: channels, width: width, height: height, toWidth: toWidth, filter: filter)
        return resizeVertically(image, channels: channels, width: toWidth, height: height, toHeight: toHeight, filter: filter)
    }

    /// Every row resampled to `toWidth` (Pillow computes only the rows the vertical pass reads; each output
    /// pixel depends on its own row alone, so computing them all gives the same values).
    private static func resizeHorizontally(_ pixels: [UInt8], channels: Int, width: Int, height: Int, toWidth: Int,
                                           filter: Filter) -> [UInt8] {
        guard toWidth != width else { return pixels }
        return horizontalPass(pixels, channels: channels, inWidth: width, rows: 0..<height,
                              weights: FilterWeights(inSize: width, outSize: toWidth, filter: filter))
    }

    private static func resizeVertically(_ pixels: [UInt8], channels: Int, width: Int, height: Int, toHeight: Int,
                                         filter: Filter) -> [UInt8] {
        guard toHeight != height else { return pixels }
        let weights = FilterWeights(inSize: height, outSize: toHeight, filter: filter)
        return verticalPass(pixels, rowBytes: width * channels, outHeight: toHeight, bounds: weights.bounds,
                            coefficients: weights.coefficients, taps: weights.taps)
    }

    /// One direction's fixed-point weights (precompute_coeffs + normalize_coeffs_8bpc): for each output
    /// position the first input index and the number of inputs, and `taps` coefficients in Q22.
    struct FilterWeights {
        /// 32 − 8 − 2: 8 bits of sample, 2 for a filter's negative lobes and overshoot.
        static let precisionBits = 22
        let taps: Int
        /// [first, count] per output position.
        var bounds: [Int]
        var coefficients: [Int32]

        /// The filter widened by the reduction factor when reducing (antialiasing), sampled at the input pixel
        /// centres around each output pixel's centre, each row normalised to sum 1 in double, then rounded to
        /// Q22 away from zero at halves.
        init(inSize: Int, outSize: Int, filter: Filter) {
            let scale = Double(inSize) / Double(outSize)
            let filterScale = max(scale, 1.0)
            let support = filter.support * filterScale
            taps = Int(support.rounded(.up)) * 2 + 1
            bounds = [Int](repeating: 0, count: 2 * outSize)
            coefficients = [Int32](repeating: 0, count: outSize * taps)
            var weights = [Double](repeating: 0, count: taps)
            let inverseScale = 1.0 / filterScale
            for position in 0..<outSize {
                let center = (Double(position) + 0.5) * scale
                // C's (int) conversion truncates toward zero
                let first = max(Int((center - support + 0.5).rounded(.towardZero)), 0)
                let end = min(Int((center + support + 0.5).rounded(.towardZero)), inSize)
                let count = end - first
                var total = 0.0
                for tap in 0..<count {
                    let weight = filter.weight((Double(tap + first) - center + 0.5) * inverseScale)
                    weights[tap] = weight
                    total += weight
                }
                for tap in 0..<count {
                    let weight = total != 0 ? weights[tap] / total : weights[tap]
                    let scaled = weight * Double(1 << Self.precisionBits)
                    coefficients[position * taps + tap] = Int32(weight < 0 ? (scaled - 0.5).rounded(.towardZero)
                                                                           : (scaled + 0.5).rounded(.towardZero))
                }
                bounds[2 * position] = first
                bounds[2 * position + 1] = count
            }
        }
    }

    /// An accumulated Q22 value to 8 bits: shifted (the rounding half was added up front), clipped to 0…255.
    @inline(__always)
    private static func clip8(_ value: Int32) -> UInt8 {
        let shifted = value >> Int32(FilterWeights.precisionBits)
        return shifted < 0 ? 0 : shifted > 255 ? 255 : UInt8(shifted)
    }

    private static func horizontalPass(_ pixels: [UInt8], channels: Int, inWidth: Int, rows: Range<Int>,
                                       weights: FilterWeights) -> [UInt8] {
        let outWidth = weights.bounds.count / 2
        var output = [UInt8](repeating: 0, count: rows.count * outWidth * channels)
        let half = Int32(1) << Int32(FilterWeights.precisionBits - 1)
        pixels.withUnsafeBufferPointer { source in
            weights.coefficients.withUnsafeBufferPointer { k in
                output.withUnsafeMutableBufferPointer { out in
                    for (outRow, row) in rows.enumerated() {
                        let rowStart = row * inWidth * channels
                        for x in 0..<outWidth {
                            let first = weights.bounds[2 * x], count = weights.bounds[2 * x + 1]
                            for c in 0..<channels {
                                var sum = half
                                for tap in 0..<count {
                                    sum &+= Int32(source[rowStart + (first + tap) * channels + c]) &* k[x * weights.taps + tap]
                                }
                                out[(outRow * outWidth + x) * channels + c] = clip8(sum)
                            }
                        }
                    }
                }
            }
        }
        return output
    }

    private static func verticalPass(_ pixels: [UInt8], rowBytes: Int, outHeight: Int, bounds: [Int],
                                     coefficients: [Int32], taps: Int) -> [UInt8] {
        var output = [UInt8](repeating: 0, count: outHeight * rowBytes)
        let half = Int32(1) << Int32(FilterWeights.precisionBits - 1)
        pixels.withUnsafeBufferPointer { source in
            coefficients.withUnsafeBufferPointer { k in
                output.withUnsafeMutableBufferPointer { out in
                    for y in 0..<outHeight {
                        let first = bounds[2 * y], count = bounds[2 * y + 1]
                        for index in 0..<rowBytes {
                            var sum = half
                            for tap in 0..<count {
                                sum &+= Int32(source[(first + tap) * rowBytes + index]) &* k[y * taps + tap]
                            }
                            out[y * rowBytes + index] = clip8(sum)
                        }
                    }
                }
            }
        }
        return output
    }

    // MARK: - BoxBlur.c

    /// GaussianBlur(radius) as ImagingGaussianBlur does it: 3 passes of an extended box blur (a box of integer
    /// radius plus fractional weights on the two next pixels) along every row, then 3 along every column,
    /// each pass rounded to 8 bits. Radius 0 is a copy.
    static func gaussianBlur(_ pixels: [UInt8], channels: Int, width: Int, height: Int, radius: Float) -> [UInt8] {
        precondition(radius >= 0 && radius.isFinite, "blur radius \(radius)")
        guard radius != 0, width > 0, height > 0 else { return pixels }
        let passes = 3
        let boxRadius = extendedBoxRadius(gaussianRadius: radius, passes: passes)
        var image = pixels
        guard boxRadius != 0 else { return image }
        let rowBytes = width * channels
        // Rows: each line is `width` pixels `channels` apart, lines `rowBytes` apart.
        for _ in 0..<passes {
            boxBlurLines(&image, count: height, lineStride: rowBytes, length: width, step: channels, channels: channels, radius: boxRadius)
        }
        for _ in 0..<passes {
            boxBlurLines(&image, count: width, lineStride: channels, length: height, step: rowBytes, channels: channels, radius: boxRadius)
        }
        return image
    }

    /// _gaussian_blur_radius: the extended box radius whose `passes`-fold repetition has the Gaussian's variance
    /// (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box filtering"), in the
    /// float and double steps Pillow takes.
    static func extendedBoxRadius(gaussianRadius radius: Float, passes: Int) -> Float {
        let sigma2 = radius * radius / Float(passes)
        let length = Float((12.0 * Double(sigma2) + 1.0).squareRoot())
        let l = Float(((Double(length) - 1.0) / 2.0).rounded(.down))
        var a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2)
        a /= 6 * (sigma2 - (l + 1) * (l + 1))
        return l + a
    }

    /// ImagingHorizontalBoxBlur along `count` lines in place. A line's pixels are `step` bytes apart and
    /// `length` long; lines start `lineStride` bytes apart. The window sums the integer box (pixels beyond the
    /// ends repeat the edge pixel) with weight ww = 2^24 / (2r + 1) (float division, truncated) and the two pixels
    /// just outside it with fw, the rest of 2^24 split between them; UInt32 arithmetic, rounded at bit 24.
    private static func boxBlurLines(_ image: inout [UInt8], count: Int, lineStride: Int, length: Int, step: Int,
                                     channels: Int, radius floatRadius: Float) {
        let radius = Int(floatRadius)
        let ww = UInt32(Float(UInt32(1) << 24) / (floatRadius * 2 + 1))
        let fw = ((UInt32(1) << 24) &- UInt32(radius * 2 + 1) &* ww) / 2
        let edgeA = min(radius + 1, length), edgeB = max(length - radius - 1, 0)
        let last = length - 1
        var line = [UInt32](repeating: 0, count: length)
        var out = [UInt8](repeating: 0, count: length)
        image.withUnsafeMutableBufferPointer { pixels in
            for lineIndex in 0..<count {
                for c in 0..<channels {
                    let base = lineIndex * lineStride + c
                    for x in 0..<length { line[x] = UInt32(pixels[base + x * step]) }
                    // The window sum for position −1: the first pixel r + 1 times, then pixels 0…r − 1, the
                    // last pixel standing in for those past the end.
                    var acc = line[0] &* UInt32(radius + 1)
                    for x in 0..<max(edgeA - 1, 0) { acc &+= line[x] }
                    acc &+= line[last] &* UInt32(truncatingIfNeeded: radius - edgeA + 1)
                    @inline(__always) func emit(_ x: Int, subtract: Int, add: Int, left: Int, right: Int) {
                        acc = acc &+ line[add] &- line[subtract]
                        let bulk = acc &* ww &+ (line[left] &+ line[right]) &* fw
                        out[x] = UInt8(truncatingIfNeeded: (bulk &+ (1 << 23)) >> 24)
                    }
                    if edgeA <= edgeB {
                        for x in 0..<edgeA { emit(x, subtract: 0, add: x + radius, left: 0, right: x + radius + 1) }
                        for x in edgeA..<edgeB {
                            emit(x, subtract: x - radius - 1, add: x + radius, left: x - radius - 1, right: x + radius + 1)
                        }
                        for x in edgeB...last { emit(x, subtract: x - radius - 1, add: last, left: x - radius - 1, right: last) }
                    } else {
                        for x in 0..<edgeB { emit(x, subtract: 0, add: x + radius, left: 0, right: x + radius + 1) }
                        for x in edgeB..<edgeA { emit(x, subtract: 0, add: last, left: 0, right: last) }
                        for x in edgeA..<(last + 1) { emit(x, subtract: x - radius - 1, add: last, left: x - radius - 1, right: last) }
                    }
                    for x in 0..<length { pixels[base + x * step] = out[x] }
                }
            }
        }
    }
}
